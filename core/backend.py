"""The backend protocol, declared capabilities, and the registry plugins add backends to.

A backend turns `(q, k, v, call, mask)` into attention output, all `[B, H, N, D]`.
Exact backends compute softmax attention; learned backends own one module per layer,
created lazily from a `LayerSpec`, and report per-layer readiness.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from .call import AttentionCall, LayerSpec
from .finite import guard_rows
from .masks import MaskKind, mask_kind

if TYPE_CHECKING:
    from torch import nn

#: The host's own attention, converted to the attnplug convention: `(q, k, v, mask) -> out`, `[B, H, N, D]`.
HostAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class StagedState:
    """A checkpoint component validated against the live object, not yet applied (`Session.load` stages every
    component, then commits them all, so a refused file changes nothing). `commit()` applies it and must not
    fail on the file's content; `layers` are the layer keys it holds (learned backends; None: not known)."""

    commit: Callable[[], None]
    layers: frozenset[str] | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve. `not_supported_reasons` checks a call against it."""

    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    devices: tuple[str, ...] = ("cpu", "cuda")
    head_dims: tuple[int, int] = (1, 1024)  # inclusive range
    mask_kinds: tuple[MaskKind, ...] = ("none", "key_padding", "full")
    learned: bool = False
    exact: bool = True
    min_tokens: int = 0
    #: serves calls whose q, k, v are one rank's slice of the sequence (`AttentionCall.shard`, `core.shard`)
    sequence_parallel: bool = False


class Backend:
    """Base class of every attention backend.

    Subclasses set `name` and `capabilities` and implement `forward`. `not_supported_reasons`
    returns an empty list when the backend can serve the call, else one reason per problem.
    """

    name: str = ""
    capabilities: Capabilities = Capabilities()

    def is_available(self) -> tuple[bool, str]:
        """Whether the backend can run at all here (installed extras, versions); reason if not."""
        return True, ""

    def not_supported_reasons(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              call: AttentionCall, mask: torch.Tensor | None = None) -> list[str]:
        """Every reason this backend cannot serve this call (empty list: it can)."""
        return capability_reasons(self.capabilities, q, k, v, mask)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(q, k, v, call, mask)

    def forward_guarded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                        mask: torch.Tensor | None, finite_flag: torch.Tensor) -> torch.Tensor:
        """`forward`, with every output row that is not finite replaced on the device and `finite_flag` (a
        one-element int32 tensor on q's device) raised — no device sync (`core.finite`). This default replaces by
        zeros after `forward` (`guard_rows`); a backend that can do better (the ttr kernels replace by their exact
        branch's row, in their last pass) overrides it."""
        return guard_rows(checked_output(self.forward(q, k, v, call, mask), q, v), finite_flag)

    # ---- learned backends override these -------------------------------------------------------
    def is_ready(self, layer_key: str) -> bool:
        """Whether this backend may serve `layer_key` (exact backends: always)."""
        return True

    def memory_estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                        training: bool = False) -> int:
        """Bytes of working memory one call needs beyond its inputs and output (a host may reserve it)."""
        b, h, n, d = q.shape
        return int(b * h * n * k.shape[2] * 4) if not self.capabilities.learned else 0

    def release(self) -> None:
        """Free device memory held between runs (called at session close)."""


class LearnedBackend(Backend):
    """A backend with one trainable module per layer, created lazily from a `LayerSpec`.

    Subclasses implement `build_layer(spec)` and `forward`. The distiller trains `layer(spec)`;
    readiness is owned by the distiller and mirrored into `ready`.
    """

    capabilities = Capabilities(learned=True, exact=False)

    def __init__(self) -> None:
        self.layers: dict[str, "nn.Module"] = {}
        self.specs: dict[str, LayerSpec] = {}
        self.ready: dict[str, bool] = {}

    def build_layer(self, spec: LayerSpec) -> "nn.Module":
        raise NotImplementedError

    def layer(self, spec: LayerSpec, device: torch.device | None = None) -> "nn.Module":
        """The module of `spec.layer_key`, built on first use (and moved to `device`)."""
        module = self.layers.get(spec.layer_key)
        if module is None:
            old = self.specs.get(spec.layer_key)
            if old is not None and old != spec:
                raise ValueError(f"layer {spec.layer_key}: spec {spec} does not match the known spec {old}")
            with torch.inference_mode(False):
                module = self.build_layer(spec)
                if device is not None:
                    module = module.to(device)
            self.layers[spec.layer_key] = module
            self.specs[spec.layer_key] = spec
        elif device is not None and _module_device(module) != device:
            with torch.inference_mode(False):
                module.to(device)
        return module

    def is_ready(self, layer_key: str) -> bool:
        return bool(self.ready.get(layer_key, False))

    # ---- the training contract (used by distillers, generic over learned backends) -------------
    def train_forward(self, layer_key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      call: AttentionCall, mask: torch.Tensor | None = None,
                      query_index: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable fp32 forward of one layer's module (autograd on, no fused kernels).

        The module must exist (`layer(spec)`); inputs are `[B, H, Nq|Nk, D]` fp32, already outside
        inference mode. `query_index` (`[Nq]` long) gives the positions of q's rows in the key sequence
        when q is a subset of the queries (the distiller subsamples them), None when q is all of them;
        a backend whose output depends on a query's position (a local window) needs it. Returns
        `[B, H, Nq, D]`.
        """
        raise NotImplementedError

    def param_groups(self, layer_key: str) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters of one layer by optimizer group: `"phi"` (feature maps, conditioner)
        and `"alpha"` (blend logits; no weight decay). Every parameter is in exactly one group."""
        raise NotImplementedError

    def layer_metrics(self, layer_key: str) -> dict[str, float]:
        """Cheap scalars about the last forward of a layer (e.g. `alpha_mean`); may be empty."""
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """Checkpoint state: tensors (layer weights) and JSON-able meta (format, specs, hyperparameters)."""
        raise NotImplementedError

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> None:
        """Restore `state()`; raise ValueError naming the mismatch when specs or hyperparameters differ."""
        raise NotImplementedError

    def prepare_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> StagedState:
        """Validate `state()` output against this backend without changing it; the returned stage applies it.

        Raise ValueError (or `CheckpointError`) naming the tensor or field that does not fit. Override it for
        atomic loads: this default validates nothing, loads at commit and cannot tell which layers it holds."""
        return StagedState(lambda: self.load_state(tensors, meta))

    def release(self) -> None:
        with torch.inference_mode(False):
            for module in self.layers.values():
                module.to("cpu")


def _module_device(module: "nn.Module") -> torch.device | None:
    for p in module.parameters():
        return p.device
    return None


def capability_reasons(caps: Capabilities, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None) -> list[str]:
    """Reasons a call does not fit declared capabilities (shared by all backends)."""
    reasons: list[str] = []
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return [f"expected q, k, v as [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"]
    if q.dtype not in caps.dtypes:
        reasons.append(f"dtype {q.dtype} not in {[str(d) for d in caps.dtypes]}")
    if q.device.type not in caps.devices:
        reasons.append(f"device {q.device.type} not in {list(caps.devices)}")
    lo, hi = caps.head_dims
    if not lo <= q.shape[-1] <= hi:
        reasons.append(f"head_dim {q.shape[-1]} outside [{lo}, {hi}]")
    if k.shape[2] < caps.min_tokens:
        reasons.append(f"{k.shape[2]} keys < min_tokens {caps.min_tokens}")
    kind = mask_kind(mask, q.shape[2], k.shape[2])
    if kind not in caps.mask_kinds:
        reasons.append(f"mask kind {kind!r} not supported (supports {list(caps.mask_kinds)})")
    return reasons


@dataclass
class BackendEntry:
    backend: Backend
    plugin: str


@dataclass
class BackendRegistry:
    """Name → backend, with the plugin that registered each. Duplicate names raise."""

    entries: dict[str, BackendEntry] = field(default_factory=dict)

    def add(self, backend: Backend, plugin: str) -> None:
        if not backend.name:
            raise ValueError(f"plugin {plugin!r} registered a backend without a name")
        old = self.entries.get(backend.name)
        if old is not None:
            raise ValueError(f"backend {backend.name!r} registered twice: by plugin {old.plugin!r} "
                             f"and by plugin {plugin!r}")
        self.entries[backend.name] = BackendEntry(backend, plugin)

    def get(self, name: str) -> Backend:
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"unknown backend {name!r}; registered: {sorted(self.entries)}")
        return entry.backend

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def items(self) -> Iterable[tuple[str, BackendEntry]]:
        return self.entries.items()


def checked_output(out: Any, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An approximate backend's output, or ValueError when it is not the `[B, H, Nq, Dv]` the host expects."""
    expected = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"returned {got}, expected an output of shape {expected}")
    return out
