"""What the host tells attnplug about one attention call: `AttentionCall` and `LayerSpec`.

Tensor convention everywhere in attnplug: q, k, v and out are `[B, H, N, D]`, after RoPE,
conditioning (text) tokens first, then image tokens. Hosts convert at the boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .shard import SequenceShard

BlockType = Literal["double", "single", "other"]


@dataclass(frozen=True)
class AttentionCall:
    """A frozen record the host fills for every attention call.

    Never guessed: every field comes from the host (the conditioning count from the host's own
    txt/img split, sigma from its scheduler). Unknown values stay `None`.

    Attributes:
        layer_key: stable per-layer name, `"double:3"`, `"single:12"` or a host-specific key.
        block_type: `"double"`, `"single"` or `"other"`.
        block_index: index of the block within its type, or -1 when unknown.
        sigma: the current noise level (flow-matching sigma in [0, 1] for Flux), or None.
        step_index: sampler step counted from 0 within the current run, or None.
        num_steps: total sampler steps of the run when the host knows them, or None.
        cond: True for the conditional pass, False for the unconditional one, None if mixed/unknown.
        cfg_scale: classifier-free guidance scale (or Flux's distilled guidance), or None.
        n_cond_tokens: number of conditioning (text) tokens at the front of the sequence.
        n_image_tokens: number of image tokens after them.
        latent_grid: (h, w) of the image-token grid, or None.
        host: `"diffusers"`, `"comfy"`, `"test"`, ...
        shard: the host's sequence-parallel layout (`core.shard.SequenceShard`) when q, k, v are this rank's slice of
            the sequence, else None. The token counts are then this rank's; `latent_grid` stays the whole image's.
    """

    layer_key: str
    block_type: BlockType = "other"
    block_index: int = -1
    sigma: float | None = None
    step_index: int | None = None
    num_steps: int | None = None
    cond: bool | None = None
    cfg_scale: float | None = None
    n_cond_tokens: int = 0
    n_image_tokens: int = 0
    latent_grid: tuple[int, int] | None = None
    host: str = "unknown"
    shard: "SequenceShard | None" = None

    @property
    def n_tokens(self) -> int:
        """Total tokens the host declared (conditioning + image)."""
        return self.n_cond_tokens + self.n_image_tokens

    def cond_in(self, n_keys: int) -> int:
        """The conditioning tokens at the front of a sequence of `n_keys` keys (the declared count,
        clamped to the sequence)."""
        return max(0, min(self.n_cond_tokens, n_keys))

    def with_(self, **changes: object) -> "AttentionCall":
        """A copy with some fields changed (the record itself is frozen)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @staticmethod
    def block_key(block_type: str, block_index: int) -> str:
        """The canonical layer key for a block, e.g. `block_key("single", 3) == "single:3"`."""
        return f"{block_type}:{block_index}"

    def check_tokens(self, n_keys: int) -> None:
        """Raise ValueError when the declared token counts cannot fit a sequence of `n_keys`."""
        if self.n_cond_tokens < 0 or self.n_image_tokens < 0:
            raise ValueError(f"AttentionCall {self.layer_key}: token counts must be >= 0, got "
                             f"n_cond_tokens={self.n_cond_tokens}, n_image_tokens={self.n_image_tokens}")
        if self.n_tokens > n_keys:
            raise ValueError(f"AttentionCall {self.layer_key}: declares {self.n_tokens} tokens "
                             f"({self.n_cond_tokens} cond + {self.n_image_tokens} image) but k has {n_keys}")


@dataclass(frozen=True)
class LayerSpec:
    """What a learned backend needs to build the module of one layer."""

    layer_key: str
    heads: int
    head_dim: int
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_tensors(cls, layer_key: str, q: "object") -> "LayerSpec":
        """Spec of a layer from its query tensor `[B, H, N, D]`."""
        shape = getattr(q, "shape")
        if len(shape) != 4:
            raise ValueError(f"q for layer {layer_key}: expected [B, H, N, D], got shape {tuple(shape)}")
        return cls(layer_key=layer_key, heads=int(shape[1]), head_dim=int(shape[3]))

    def to_json(self) -> dict[str, object]:
        return {"layer_key": self.layer_key, "heads": self.heads, "head_dim": self.head_dim}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "LayerSpec":
        return cls(layer_key=str(data["layer_key"]), heads=int(data["heads"]),  # type: ignore[arg-type]
                   head_dim=int(data["head_dim"]))  # type: ignore[arg-type]


def infer_grid(n_image_tokens: int) -> tuple[int, int] | None:
    """A square grid for `n_image_tokens` when it is a perfect square, else None (never a guess)."""
    side = math.isqrt(n_image_tokens)
    return (side, side) if side * side == n_image_tokens and side > 0 else None
