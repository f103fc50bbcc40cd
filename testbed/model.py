"""The testbed network: a small diffusers `FluxTransformer2DModel` plus a conditioning embedder.

`TestbedModel.velocity(x_t, sigma, prompts)` predicts the flow-matching velocity (noise - x0) for
packed image tokens x_t [B, N, 4] at noise level sigma in [0, 1] (Flux convention: the transformer
receives `timestep = sigma` and scales it by 1000 itself). The conditioning embedder turns a prompt
[B, G, G] of digit classes into G*G "text" tokens (class embedding + cell embedding, in
joint_attention_dim) and a pooled vector (mean of the class embeddings, projected). Weights are stored
with `attnplug.core.checkpoint` (safetensors + JSON metadata, atomic, never pickle) in fp16.
diffusers is imported when a model is built, not when this module is imported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from . import data

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "testbed.safetensors"
COMPONENT_TRANSFORMER = "transformer"
COMPONENT_COND = "cond"
FORMAT = "attnplug-testbed"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TestbedConfig:
    """Architecture of the testbed (2 double + 6 single blocks, 4 heads x 32, joint dim 64: 2.8 M params)."""

    __test__ = False  # not a pytest class

    grid: int = data.DEFAULT_GRID
    num_layers: int = 2  # double (joint) blocks
    num_single_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    joint_attention_dim: int = 64
    pooled_projection_dim: int = 64
    axes_dims_rope: tuple[int, int, int] = field(default=(8, 12, 12))

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"TestbedConfig.axes_dims_rope {self.axes_dims_rope} must sum to "
                             f"attention_head_dim {self.attention_head_dim}")

    def layer_keys(self) -> list[str]:
        """The attnplug layer keys of this architecture's attention layers (as the diffusers host names them)."""
        return [f"double:{i}" for i in range(self.num_layers)] + [f"single:{i}" for i in range(self.num_single_layers)]

    def transformer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' `FluxTransformer2DModel`."""
        return dict(patch_size=1, in_channels=data.PATCH * data.PATCH, out_channels=None,
                    num_layers=self.num_layers, num_single_layers=self.num_single_layers,
                    attention_head_dim=self.attention_head_dim, num_attention_heads=self.num_attention_heads,
                    joint_attention_dim=self.joint_attention_dim, pooled_projection_dim=self.pooled_projection_dim,
                    guidance_embeds=False, axes_dims_rope=tuple(self.axes_dims_rope))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TestbedConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"TestbedConfig: unknown fields {sorted(unknown)}")
        d = dict(d)
        if "axes_dims_rope" in d:
            d["axes_dims_rope"] = tuple(d["axes_dims_rope"])
        return cls(**d)


class CondEmbedder(nn.Module):
    """Prompt [B, G, G] of classes -> (tokens [B, G*G, joint_dim], pooled [B, pooled_dim])."""

    def __init__(self, cfg: TestbedConfig) -> None:
        super().__init__()
        self.grid = cfg.grid
        self.class_emb = nn.Embedding(data.NUM_CLASSES, cfg.joint_attention_dim)
        self.cell_emb = nn.Embedding(cfg.grid * cfg.grid, cfg.joint_attention_dim)
        self.pool = nn.Linear(cfg.joint_attention_dim, cfg.pooled_projection_dim)
        nn.init.normal_(self.class_emb.weight, std=1.0)
        nn.init.normal_(self.cell_emb.weight, std=1.0)

    def forward(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if prompts.ndim != 3 or prompts.shape[1:] != (self.grid, self.grid):
            raise ValueError(f"CondEmbedder: prompts must be [B, {self.grid}, {self.grid}], got {tuple(prompts.shape)}")
        flat = prompts.reshape(prompts.shape[0], -1).long()
        cls = self.class_emb(flat)
        tokens = cls + self.cell_emb.weight[None]
        return tokens, self.pool(cls.mean(1))


def build_transformer(cfg: TestbedConfig) -> nn.Module:
    """A freshly initialised diffusers `FluxTransformer2DModel` for `cfg` (imports diffusers)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**cfg.transformer_kwargs())


class TestbedModel(nn.Module):
    """Transformer + conditioning embedder. `transformer` is the plain diffusers module, so a host
    (e.g. attnplug's diffusers host) can patch its attention processors in place."""

    __test__ = False  # not a pytest class

    def __init__(self, cfg: TestbedConfig | None = None, transformer: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg or TestbedConfig()
        self.transformer = transformer if transformer is not None else build_transformer(self.cfg)
        self.cond = CondEmbedder(self.cfg)
        self.register_buffer("img_ids", data.img_ids(self.cfg.grid), persistent=False)
        self.register_buffer("txt_ids", data.txt_ids(self.cfg.grid), persistent=False)

    @property
    def image_size(self) -> int:
        return data.image_size(self.cfg.grid)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // data.PATCH) ** 2

    def velocity(self, x_t: torch.Tensor, sigma: torch.Tensor | float, prompts: torch.Tensor) -> torch.Tensor:
        """Predicted velocity (noise - x0) [B, N, 4] for packed tokens x_t [B, N, 4] at `sigma` (scalar or [B])."""
        b, n, c = x_t.shape
        if n != self.num_image_tokens or c != data.PATCH * data.PATCH:
            raise ValueError(f"TestbedModel.velocity: x_t must be [B, {self.num_image_tokens}, 4], got {tuple(x_t.shape)}")
        sigma_t = torch.as_tensor(sigma, device=x_t.device, dtype=x_t.dtype)
        sigma_t = sigma_t.expand(b) if sigma_t.ndim == 0 else sigma_t
        tokens, pooled = self.cond(prompts.to(x_t.device))
        dt = x_t.dtype
        return self.transformer(hidden_states=x_t, encoder_hidden_states=tokens.to(dt), pooled_projections=pooled.to(dt),
                                timestep=sigma_t, img_ids=self.img_ids, txt_ids=self.txt_ids,
                                return_dict=False)[0]

    forward = velocity

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------ I/O
    def save(self, path: str | Path, extra_meta: dict[str, Any] | None = None,
             dtype: torch.dtype = torch.float16) -> Path:
        """Write the weights (cast to `dtype`, default fp16) and config to `path` atomically."""
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": self.cfg.to_dict(),
                "dtype": str(dtype).removeprefix("torch."), **(extra_meta or {})}
        def cast(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        return save_checkpoint(path, {COMPONENT_TRANSFORMER: (cast(self.transformer.state_dict()), meta),
                                      COMPONENT_COND: (cast(self.cond.state_dict()), {})})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> TestbedModel:
        """Load weights written by `save`; refuses files of another format or architecture."""
        comps = load_checkpoint(path)
        if COMPONENT_TRANSFORMER not in comps or COMPONENT_COND not in comps:
            raise CheckpointError(f"{path}: expected components {COMPONENT_TRANSFORMER!r} and {COMPONENT_COND!r}, "
                                  f"found {sorted(comps)}")
        t_sd, meta = comps[COMPONENT_TRANSFORMER]
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        model = cls(TestbedConfig.from_dict(meta["config"]))
        for name, module, sd in (("transformer", model.transformer, t_sd), ("cond", model.cond, comps[COMPONENT_COND][0])):
            missing, unexpected = module.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise CheckpointError(f"{path}: {name} weights do not match the config: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
        model.meta = meta
        return model.to(device=device, dtype=dtype).eval()


def load_testbed(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 path: str | Path | None = None, testbed: str | None = None) -> TestbedModel:
    """A trained testbed model in eval mode: the file `path` when given, else the weights of the registry's testbed
    `testbed` (None: the default, `testbed/weights/testbed.safetensors`; `registry.TestbedMissing` when absent)."""
    if path is None:
        from .registry import get_testbed

        return get_testbed(testbed).load(device, dtype)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"testbed weights not found at {p} (train them with `python -m attnplug.testbed.train`)")
    return TestbedModel.load(p, device=device, dtype=dtype)
