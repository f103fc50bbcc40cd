"""Shared fakes of the distiller tests (no tests here): a 1-layer feature-map linear-attention backend
that implements the learned-backend training contract, a test plugin, structured synthetic data.

Test files load this module by path with importlib (tests/ is not a package).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from attnplug.core import AttentionCall, Capabilities, LayerSpec, LearnedBackend, Plugins, Session, hookimpl
from attnplug.core.config import Strict
from attnplug.plugins.ttr.distill import DistillSettings, register_distiller


class FakeLayer(torch.nn.Module):
    """φ(x) = elu(W x) + 1 (shared over heads), normalized linear attention, blended with mean(V) by
    a = 0.2·σ(alpha) (an 'alpha' group to exercise the optimizer groups)."""

    def __init__(self, head_dim: int, features: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.phi_q = torch.nn.Linear(head_dim, features)
        self.phi_k = torch.nn.Linear(head_dim, features)
        with torch.no_grad():
            for lin in (self.phi_q, self.phi_k):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
                lin.bias.zero_()
        self.alpha = torch.nn.Parameter(torch.tensor(-2.2))
        self.last_alpha = 0.0

    def weights(
        self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fq = F.elu(self.phi_q(q)) + 1
        fk = F.elu(self.phi_k(k)) + 1
        if mask is not None:
            fk = fk * mask[:, None, :, None].to(fk.dtype)
        return fq, fk

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        fq, fk = self.weights(q, k, mask)
        kv = torch.einsum("bhkf,bhkd->bhfd", fk, v)
        z = fk.sum(2)
        out_k = (
            torch.einsum("bhqf,bhfd->bhqd", fq, kv)
            / torch.einsum("bhqf,bhf->bhq", fq, z).clamp_min(1e-6)[..., None]
        )
        if mask is None:
            mean_v = v.mean(2, keepdim=True)
        else:
            m = mask[:, None, :, None].to(v.dtype)
            mean_v = (v * m).sum(2, keepdim=True) / m.sum(2, keepdim=True).clamp_min(1)
        a = 0.2 * torch.sigmoid(self.alpha)
        self.last_alpha = float(a.detach())
        return out_k + a * (mean_v - out_k)


class FakeBackend(LearnedBackend):
    """Learned backend honouring the training contract; can inject out-of-memory errors."""

    name = "fake"
    capabilities = Capabilities(learned=True, exact=False, mask_kinds=("none", "key_padding"))

    def __init__(self) -> None:
        super().__init__()
        self.oom_budget: dict[str, int] = {}  # layer -> OOMs still to raise from train_forward
        self.chunk: dict[str, int] = {}
        self.train_calls: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []

    def build_layer(self, spec: LayerSpec) -> torch.nn.Module:
        self.chunk.setdefault(spec.layer_key, 64)
        return FakeLayer(spec.head_dim)

    def forward(self, q, k, v, call, mask=None):  # type: ignore[no-untyped-def]
        module = self.layer(LayerSpec.from_tensors(call.layer_key, q), q.device)
        kp = None if mask is None else mask
        return module(q.float(), k.float(), v.float(), kp).to(q.dtype)

    def train_forward(self, layer_key, q, k, v, call, mask=None, query_index=None):  # type: ignore[no-untyped-def]
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        for t in (q, k, v):
            assert t.dtype == torch.float32 and not t.is_inference()
        self.train_calls.append((layer_key, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        if self.oom_budget.get(layer_key, 0) > 0:
            self.oom_budget[layer_key] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return self.layers[layer_key](q, k, v, mask)

    def param_groups(self, layer_key):  # type: ignore[no-untyped-def]
        m = self.layers[layer_key]
        return {"phi": [*m.phi_q.parameters(), *m.phi_k.parameters()], "alpha": [m.alpha]}

    def layer_metrics(self, layer_key):  # type: ignore[no-untyped-def]
        return {"alpha_mean": self.layers[layer_key].last_alpha}

    def attention_weights(self, layer_key, q, k, call, mask=None):  # type: ignore[no-untyped-def]
        fq, fk = self.layers[layer_key].weights(q, k, mask)
        w = torch.einsum("bhqf,bhkf->bhqk", fq, fk)
        return w / w.sum(-1, keepdim=True)

    def shrink_training_memory(self, layer_key: str) -> dict[str, int] | None:
        c = self.chunk.get(layer_key, 64)
        if c <= 16:
            return None
        self.chunk[layer_key] = c // 2
        return {"chunk": c // 2}

    def state(self):  # type: ignore[no-untyped-def]
        tensors = {f"{key}/{n}": t for key, m in self.layers.items() for n, t in m.state_dict().items()}
        return tensors, {"specs": [s.to_json() for s in self.specs.values()], "chunk": dict(self.chunk)}

    def load_state(self, tensors, meta):  # type: ignore[no-untyped-def]
        with torch.inference_mode(False):
            for sj in meta["specs"]:
                spec = LayerSpec.from_json(sj)
                m = self.layer(spec)
                m.load_state_dict(
                    {
                        n.split("/", 1)[1]: t.clone()
                        for n, t in tensors.items()
                        if n.split("/", 1)[0] == spec.layer_key
                    }
                )
        self.chunk.update(meta.get("chunk", {}))


class FakeSection(Strict):
    """Placeholder section of the fake plugin (the distiller reads [plugins.distill])."""


class FakePlugin:
    def __init__(self) -> None:
        self.backend: FakeBackend | None = None

    @hookimpl
    def attnplug_register_backends(self, registrar: Any) -> None:
        def factory(settings: Any, session: Session) -> FakeBackend:
            self.backend = FakeBackend()
            return self.backend

        factory.capabilities = FakeBackend.capabilities  # type: ignore[attr-defined]
        registrar.add("fake", factory)

    @hookimpl
    def attnplug_register_distillers(self, registrar: Any) -> None:
        register_distiller(registrar, name="fake_distill")

    @hookimpl
    def attnplug_config_sections(self) -> dict[str, Any]:
        return {"distill": DistillSettings}


def make_plugins() -> Plugins:
    """Only the core plugin plus the fake one (independent of the real ttr/landmark plugins)."""
    plugins = Plugins(load_entry_points=False, builtins={"core": "attnplug.core.builtin"})
    plugins.register(FakePlugin(), name="fakedistill")
    return plugins


def make_session(distill: dict[str, Any] | None = None, **root: Any) -> Session:
    cfg: dict[str, Any] = {
        "backend": "fake",
        "exact": "sdpa",
        "training": True,
        "distiller": "fake_distill",
        "loggers": [],
        "seed": 3,
        "plugins": {"distill": {"student": "fake", **(distill or {})}},
    }
    cfg.update(root)
    return Session(cfg, make_plugins())


# ---- structured synthetic data: exact softmax on clustered q/k/v ----------------------------------
_CENTERS = torch.nn.functional.normalize(
    torch.randn(4, 16, generator=torch.Generator().manual_seed(1234)), dim=-1
)
_VALUES = torch.randn(4, 16, generator=torch.Generator().manual_seed(4321))


def make_qkv(
    gen: torch.Generator,
    b: int = 1,
    h: int = 2,
    n: int = 96,
    scale: float = 4.0,
    noise: float = 0.3,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k share cluster centres (attention stays within a cluster); v carries the cluster's value."""
    z = torch.randint(0, 4, (b, h, n), generator=gen)
    q = scale * _CENTERS[z] + noise * torch.randn(b, h, n, 16, generator=gen)
    k = scale * _CENTERS[z] + noise * torch.randn(b, h, n, 16, generator=gen)
    v = _VALUES[z] + noise * torch.randn(b, h, n, 16, generator=gen)
    return q.to(device), k.to(device), v.to(device)


def run_sampling(
    session: Session,
    runs: int,
    steps: int,
    layers: list[str],
    gen: torch.Generator,
    n: int = 96,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """Drive `runs` sampling runs of `steps` steps over `layers` (cond pass only); returns outputs."""
    outs = []
    for _ in range(runs):
        session.run_start(num_steps=steps)
        for step in range(steps):
            sigma = 1.0 - step / steps
            for key in layers:
                q, k, v = make_qkv(gen, n=n, device=device)
                call = AttentionCall(
                    layer_key=key,
                    block_type="single",
                    block_index=int(key.split(":")[1]),
                    sigma=sigma,
                    step_index=step,
                    num_steps=steps,
                    n_cond_tokens=8,
                    n_image_tokens=n - 8,
                    host="test",
                )
                outs.append(session.attention(q, k, v, call))
        session.run_end()
    return outs


def test_fake_backend_honours_the_training_contract():
    """The fake itself: param groups partition the parameters; train_forward equals forward."""
    backend = FakeBackend()
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(gen, n=24)
    call = AttentionCall("single:0", "single", 0, host="test")
    module = backend.layer(LayerSpec.from_tensors("single:0", q))
    groups = backend.param_groups("single:0")
    assert sorted(id(p) for g in groups.values() for p in g) == sorted(id(p) for p in module.parameters())
    with torch.no_grad():
        expected = backend(q, k, v, call)
    out = backend.train_forward("single:0", q, k, v, call)
    assert out.requires_grad and torch.allclose(out, expected, atol=1e-6)
    w = backend.attention_weights("single:0", q, k, call)
    assert torch.allclose(w.sum(-1), torch.ones(1, 2, 24), atol=1e-5)
