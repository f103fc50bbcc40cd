"""What `attnplug bench` times: SDPA backends, registered backends, ttr/landmark layer variants
(PyTorch path and fused Triton path), SageAttention / flash-attn when installed — each with its
FLOP and byte count (the floor). The fused ttr variants and SDPA cuDNN also come as `… graph`
variants: the call captured once in a CUDA graph and replayed, which shows how much of a small
size's time is launch overhead."""
from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..plugins.landmark.settings import LandmarkSettings
from ..plugins.ttr.settings import TtrSettings

Fn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    """One attention layer's shape: batch, heads, tokens (text first), head dim, text tokens."""

    label: str
    b: int
    h: int
    n: int
    d: int
    txt: int

    @property
    def grid(self) -> tuple[int, int] | None:
        """`(h, w)` latent grid of the image tokens: square for a Flux size (side/16 tokens per side, as
        `bench.run.parse_shape` builds them), else the most nearly square factorisation; None without image
        tokens. Calls carry it (the landmark window and the 'stratified' layout read it)."""
        n_img = self.n - self.txt
        if n_img <= 0:
            return None
        h = max(f for f in range(1, int(n_img ** 0.5) + 1) if n_img % f == 0)
        return h, n_img // h


@dataclass
class Variant:
    """One thing to time: `make(q, k, v)` returns a zero-argument callable producing the output."""

    name: str
    family: str  # "sdpa", "backend", "ttr", "external"
    make: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Fn]
    cost: tuple[float, float]  # FLOPs, bytes (the floor's two terms)
    skip: str | None = None
    check_against: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    graph_of: str | None = None  # a CUDA-graph replay of this variant (its ratio is against the graph SDPA)


#: The product default layer, read from the settings' own defaults (it cannot drift): φ, α_max and the
#: landmark branch.
_TTR_DEFAULT = TtrSettings().model_dump(include={"depth", "hidden", "feature_dim", "alpha_max", "alpha_reference"})
_LM_DEFAULT = LandmarkSettings().model_dump(include={"fraction", "min", "max", "window"})
#: The configurations other than "default*" pin the previous default's α (α_max 0.2, no window, and the landmark
#: budgets they name), so each keeps timing the layer its docs/PERFORMANCE.md rows measured.
_A_PREV = {"alpha_max": 0.2, "alpha_reference": "call"}
_PHI_PREV = {"depth": 2, "hidden": 256, "feature_dim": 128, **_A_PREV}  # the 2-layer map
_PHI_LEAN = {"depth": 1, "hidden": 0, "feature_dim": 128, **_A_PREV}
_LM_PREV = {"fraction": 0.08, "min": 64, "max": 0, "window": 0}
_LM_2PCT = {"fraction": 0.02, "min": 16, "max": 0, "window": 0}

#: ttr layer configurations, `name: (ttr settings, landmark settings)`: the product default
#: (window r = 2, α_max 0.5, 2 % landmarks; docs/QUALITY.md "The default layer"), the
#: previous default (8 % landmarks, no window, α_max 0.2), the earlier node pack's layer (3-layer φ, F = 256,
#: L2 norm: `3layer-F256`), a lean one, one per row of
#: docs/QUALITY.md's feature-map table (testbed/quality.py variants of the same names), the previous
#: default with 2 % landmarks, with the landmark cap that keeps the layer linear-time (docs/PERFORMANCE.md,
#: "The floor of the previous default") and with the local window of radius 2, and the lean layer with the
#: window. `--configs` times a subset.
TTR_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": (_TTR_DEFAULT, _LM_DEFAULT),
    # adaptive α's d against the call's mean (two query passes) or a running mean (one pass)
    "default-call-alpha": ({**_TTR_DEFAULT, "alpha_reference": "call"}, _LM_DEFAULT),
    "default-running-alpha": ({**_TTR_DEFAULT, "alpha_reference": "running"}, _LM_DEFAULT),
    "previous-default": (_PHI_PREV, _LM_PREV),
    "3layer-F256": ({"depth": 3, "hidden": 0, "feature_dim": 256, "l2_norm": True, **_A_PREV}, _LM_PREV),
    "lean": (_PHI_LEAN, {"fraction": 0.02, "min": 64, "max": 0, "window": 0}),
    "hedgehog-F64": ({"depth": 1, "feature_dim": 64, "activation": "hedgehog", **_A_PREV}, _LM_PREV),
    "1layer-F128": ({"depth": 1, "feature_dim": 128, **_A_PREV}, _LM_PREV),
    "previous-default-lm2pct": (_PHI_PREV, _LM_2PCT),
    "previous-default-cap1024": (_PHI_PREV, {**_LM_PREV, "max": 1024}),
    "previous-default-window2": (_PHI_PREV, {**_LM_PREV, "window": 2}),
    "lean-window2": (_PHI_LEAN, {**_LM_2PCT, "window": 2}),
    # the joint layer on a double-block call (every interaction with text tokens exact; plugins/ttr/joint.py):
    # product-path and PyTorch rows only (no fused kernels of its own yet)
    "joint": ({**_TTR_DEFAULT, "joint_layers": ["double:*"]}, _LM_DEFAULT),
    # the product default with one change: the large testbeds' speed-vs-quality front (testbed/quality.py's
    # LARGE_VARIANTS, BENCH_CONFIG names these)
    "default-lm1pct": (_TTR_DEFAULT, {**_LM_DEFAULT, "fraction": 0.01}),
    "default-max256": (_TTR_DEFAULT, {**_LM_DEFAULT, "max": 256}),
    "default-max128": (_TTR_DEFAULT, {**_LM_DEFAULT, "max": 128}),
    "default-window1": (_TTR_DEFAULT, {**_LM_DEFAULT, "window": 1}),
    "default-window4": (_TTR_DEFAULT, {**_LM_DEFAULT, "window": 4}),
    "default-1layer-F64": ({**_TTR_DEFAULT, "depth": 1, "feature_dim": 64}, _LM_DEFAULT),
    "default-1layer-F128": ({**_TTR_DEFAULT, "depth": 1, "feature_dim": 128}, _LM_DEFAULT),
    # the exact branch's products in e4m3 (`[plugins.landmark] precision = "fp8"`; its PyTorch row emulates it)
    "default-fp8": (_TTR_DEFAULT, {**_LM_DEFAULT, "precision": "fp8"}),
    "joint-fp8": ({**_TTR_DEFAULT, "joint_layers": ["double:*"]}, {**_LM_DEFAULT, "precision": "fp8"}),
}
#: Former configuration names: old name → current name, for the error message. The `default-*` ones were deltas
#: from the previous default and would now describe another layer.
RENAMED: dict[str, str] = {"default-lm2pct": "previous-default-lm2pct", "default-cap1024": "previous-default-cap1024",
                           "default-window2": "previous-default-window2", "seed": "3layer-F256"}


def _es(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def exact_cost(s: Shape, dtype: torch.dtype) -> tuple[float, float]:
    return 4.0 * s.b * s.h * s.n * s.n * s.d, 4.0 * s.b * s.h * s.n * s.d * _es(dtype)


def ttr_cost(s: Shape, dtype: torch.dtype, layer_dims: list[tuple[int, int]], feature_dim: int,
             n_landmarks: int, window_keys: float = 0.0) -> tuple[float, float]:
    """φ MLP on q and k, S and z, the query pass, the landmark softmax (and `window_keys`, the mean number
    of window keys per token of a landmark window); bytes: q, k, v in, out out."""
    phi = 2.0 * sum(a * b for a, b in layer_dims) * 2  # q and k
    per_token = phi + 2.0 * feature_dim * s.d * 2 + 4.0 * (n_landmarks + window_keys) * s.d
    return s.b * s.h * s.n * per_token, 4.0 * s.b * s.h * s.n * s.d * _es(dtype)


class _FakeSession:
    """The little of a Session a standalone backend reads: the backend registry (for the ttr → landmark lookup)."""

    def __init__(self, backends: Any) -> None:
        self.backends = backends


def _call(s: Shape, layer_key: str = "single:0") -> Any:
    from ..core.call import AttentionCall

    kind, _, index = layer_key.partition(":")
    return AttentionCall(layer_key=layer_key, block_type=kind, block_index=int(index), n_cond_tokens=s.txt,
                         n_image_tokens=s.n - s.txt, latent_grid=s.grid, host="bench")


def is_joint(tset: dict[str, Any]) -> bool:
    """A configuration of the joint layer: its rows time a double-block call, and its one bare-kernel row is the
    joint plan's (`_joint_fused_maker`)."""
    return bool(tset.get("joint_layers"))


def window_keys(s: Shape, radius: int) -> float:
    """Mean number of keys in a token's local window of `radius` (image tokens; clipped at the grid's
    borders; conditioning tokens have none), over all tokens — the window's share of the floor."""
    if radius <= 0 or s.grid is None:
        return 0.0
    h, w = s.grid

    def span(size: int) -> int:  # Σ over positions of the clipped window's extent along one axis
        return sum(min(i + radius, size - 1) - max(i - radius, 0) + 1 for i in range(size))
    return span(h) * span(w) / s.n


def _lm_window(lm_backend: Any) -> int:
    return int(getattr(getattr(lm_backend, "settings", None), "window", 0) or 0)


def build_variants(s: Shape, dtype: torch.dtype, device: torch.device, only: list[str] | None = None,
                   configs: list[str] | None = None, graphs: bool = True) -> list[Variant]:
    """Every variant for one shape and dtype. `only`: keep variants whose name contains one of these
    substrings, and the variants they (when not skipped) are checked against (the SDPA family always stays:
    it is the baseline); `configs`: the TTR_CONFIGS to time
    (default all); `graphs`: add the CUDA-graph replays."""
    out: list[Variant] = []
    out += _sdpa_variants(s, dtype, device, graphs)
    out += _registered_variants(s, dtype, device)
    out += _ttr_variants(s, dtype, device, configs, graphs)
    out += _external_variants(s, dtype, device)
    if only:
        keep = {v.name for v in out if v.family == "sdpa" or any(o in v.name for o in only)}
        by_name = {v.name: v for v in out}
        todo = list(keep)
        while todo:  # and what they are checked against (a graph row's fused row, a fused row's PyTorch path)
            var = by_name[todo.pop()]
            ref = None if var.skip else var.check_against
            if ref in by_name and ref not in keep:
                keep.add(ref)
                todo.append(ref)
        out = [v for v in out if v.name in keep]
    return out


def unknown_configs(names: list[str]) -> list[str]:
    """The names that are not TTR_CONFIGS keys (for the command line's error message)."""
    return [n for n in names if n not in TTR_CONFIGS]


def renamed_hint(names: list[str]) -> str:
    """'' or a sentence naming the current names of renamed configurations among `names`."""
    old = [n for n in names if n in RENAMED]
    if not old:
        return ""
    return " (renamed: " + ", ".join(
        f"{n} → {RENAMED[n]}" for n in old) + ")"


# ---- CUDA graphs --------------------------------------------------------------------------------------
class GraphCaptureError(RuntimeError):
    """A variant could not be captured in a CUDA graph (a host sync, a CPU→GPU copy, a data-dependent
    shape inside the call); the message names the first error raised during the capture."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def capture_graph(fn: Fn, device: torch.device, warmup: int = 3) -> Fn:
    """Capture one call of `fn` in a `torch.cuda.CUDAGraph` and return a callable that replays it and
    returns the captured (static) output.

    As torch's docs prescribe, `fn` first runs `warmup` times on a side stream (lazy inits, Triton
    compiles, cuDNN plans, cached weight casts happen there, not in the graph). The returned callable
    carries `peak_extra_bytes`: device memory allocated during the capture beyond what was allocated
    before it — what the graph's private pool keeps while the graph lives (a replay allocates nothing).
    """
    if device.type != "cuda":
        raise GraphCaptureError(f"CUDA graphs need a CUDA device, got {device.type}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.cuda.graph(graph):
            static_out = fn()
    except Exception as exc:  # report why: the bench records it as the row's skip reason
        first: BaseException = exc
        while first.__context__ is not None and first.__context__ is not first:
            first = first.__context__  # the error raised inside the capture (ending it raises another)
        why = _first_line(first) + ("" if first is exc else f" (then, ending the capture: {_first_line(exc)})")
        raise GraphCaptureError(f"cannot capture in a CUDA graph: {why}") from exc
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base

    def replay() -> torch.Tensor:
        graph.replay()
        return static_out

    replay.peak_extra_bytes = int(peak)  # type: ignore[attr-defined]
    replay.graph = graph  # type: ignore[attr-defined]  # keeps the graph (and its pool) alive with the callable
    return replay


def graph_variant(base: Variant, device: torch.device) -> Variant:
    """`<base> graph`: `base` captured once in a CUDA graph and replayed; checked against `base`'s output."""
    skip = base.skip
    if device.type != "cuda":
        skip = f"CUDA graphs need a CUDA device (this run: {device.type})"

    def make(q, k, v):
        return capture_graph(base.make(q, k, v), q.device)

    return Variant(f"{base.name} graph", base.family, make, base.cost, skip, check_against=base.name,
                   notes={**base.notes, "graph_of": base.name}, graph_of=base.name)


def _sdpa_variants(s: Shape, dtype: torch.dtype, device: torch.device, graphs: bool = True) -> list[Variant]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cost = exact_cost(s, dtype)
    kinds = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
             ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]
    res = []
    for label, kind in kinds:
        skip = None
        if device.type == "cuda" and label == "math" and s.n > 20000:
            skip = "math backend at this size needs O(N²) memory"
        if device.type != "cuda" and label != "math":
            skip = "CUDA-only SDPA backend"

        def make(q, k, v, kind=kind):
            def fn():
                with sdpa_kernel([kind]):
                    return F.scaled_dot_product_attention(q, k, v)
            return fn
        res.append(Variant(f"sdpa[{label}]", "sdpa", make, cost, skip))
    if graphs:  # the baseline of the fused ttr graph variants
        res.append(graph_variant(res[0], device))
    return res


def _registry() -> tuple[Any, Any]:
    from ..core.backend import BackendRegistry
    from ..core.plugins import get_plugins

    reg = get_plugins().collect("backend")
    return reg, BackendRegistry()


def _build_backend(name: str, overrides: dict[str, Any] | None = None, landmark_overrides: dict[str, Any] | None = None):
    """A registered backend built standalone with default (or overridden) settings, and a fake session
    whose registry also holds the landmark backend (so the ttr hybrid finds its residual)."""
    reg, backends = _registry()
    session = _FakeSession(backends)
    if "landmark" in reg.names() and name != "landmark":
        lr = reg.get("landmark")
        lset = lr.settings(**(landmark_overrides or {})) if lr.settings else None
        backends.add(_named(lr.factory(lset, session), "landmark"), lr.plugin)
    r = reg.get(name)
    settings = r.settings(**(overrides or {})) if r.settings else None
    return r.factory(settings, session), backends


def _named(b: Any, name: str) -> Any:
    if not getattr(b, "name", ""):
        b.name = name
    return b


def _registered_variants(s: Shape, dtype: torch.dtype, device: torch.device) -> list[Variant]:
    try:
        reg, _ = _registry()
        names = reg.names()
    except Exception as exc:  # noqa: BLE001
        return [Variant("backend:*", "backend", lambda q, k, v: (lambda: q), (0, 0), f"registry: {exc}")]
    res = []
    call = _call(s)
    for name in names:
        if name == "host":
            continue  # needs the host's own attention function: not standalone
        skip = None
        cost = exact_cost(s, dtype)
        try:
            backend, _ = _build_backend(name)
            if name == "landmark" and hasattr(backend, "count"):
                n_l = backend.count(s.n, s.txt)
                cost = (4.0 * s.b * s.h * s.n * n_l * s.d, exact_cost(s, dtype)[1])
            if name == "ttr":
                cost = _ttr_cost_from_settings(s, dtype, backend)
        except Exception as exc:  # noqa: BLE001
            backend, skip = None, f"cannot build standalone: {type(exc).__name__}: {exc}"

        def make(q, k, v, backend=backend):
            reasons = backend.not_supported_reasons(q, k, v, call)
            if reasons:
                raise RuntimeError("; ".join(reasons))

            def fn():
                with torch.inference_mode():
                    return backend.forward(q, k, v, call)
            return fn
        res.append(Variant(f"backend:{name}", "backend", make, cost, skip))
    return res


def _ttr_cost_from_settings(s: Shape, dtype: torch.dtype, backend: Any) -> tuple[float, float]:
    st = backend.settings
    hidden = st.hidden_for(s.d)
    out_dim = st.feature_dim // 2 if st.activation == "hedgehog" else st.feature_dim
    dims = [s.d] + [hidden] * (st.depth - 1) + [out_dim]
    n_l = 0
    n_w = 0.0
    residual = backend.residual()
    if residual is not None:
        n_l = residual.count(s.n, s.txt)
        n_w = window_keys(s, _lm_window(residual))
    return ttr_cost(s, dtype, list(itertools.pairwise(dims)), st.feature_dim, n_l, n_w)


#: The running mean of d a layer with random weights stands in with (`alpha_reference = "running"`): a distilled
#: layer has its own; the kernels' time does not depend on the value.
STAND_IN_D_REFERENCE = 0.1


def stand_in_reference(ttr: TtrSettings, heads: int, device: torch.device) -> torch.Tensor | None:
    """`[heads]` stand-in running reference of d for `ttr` (adaptive α, "running"), else None (the call's mean)."""
    if ttr.adaptive_alpha and ttr.alpha_reference == "running":
        return torch.full((heads,), STAND_IN_D_REFERENCE, device=device)
    return None


def give_stand_in_reference(layer: Any, ttr: TtrSettings, device: torch.device) -> None:
    """Give a ttr layer without a running mean of d the stand-in, where `ttr` serves with one (random layers keep
    none; a distilled one has its own), so that timings run the kernels a distilled layer runs."""
    ref = stand_in_reference(ttr, layer.heads, device)
    if ref is not None and not layer.reference_tracked:
        layer.set_d_reference(ref)


def _bench_layer(backend: Any, call: Any, q: torch.Tensor) -> Any:
    """The backend's layer for q's shape, with the stand-in reference where its settings want one."""
    from ..core.call import LayerSpec

    layer = backend.layer(LayerSpec.from_tensors(call.layer_key, q), q.device)
    give_stand_in_reference(layer, backend.settings, q.device)
    return layer


#: What the product-path rows tell the session about their call: a sampler step (the σ/CFG conditioner runs).
SESSION_CALL = {"sigma": 0.5, "cfg_scale": 3.5, "step_index": 0, "num_steps": 20}


def _session_maker(tset: dict[str, Any], lset: dict[str, Any], reference: Any, call: Any,
                   finite_check: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Fn]:
    """`session ttr-<config>`: what a user's call runs — `Session.attention` with a ready layer of this configuration
    (its own defaults: kernel, feature precision), a sampler step's `AttentionCall`, the configured non-finite
    check; the layer holds the weights of `reference`'s layer (the PyTorch row it is checked against)."""
    def make(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Fn:
        from ..core.call import LayerSpec
        from ..core.session import Session

        session = Session({"backend": "ttr", "exact": "sdpa", "loggers": [], "strict": True,
                           "finite_check": finite_check, "plugins": {"ttr": dict(tset), "landmark": dict(lset)}})
        ttr = session.backends.get("ttr")
        source = _bench_layer(reference, call, q)
        ttr.layer(LayerSpec.from_tensors(call.layer_key, q), q.device).load_state_dict(source.state_dict())
        ttr.ready[call.layer_key] = True  # type: ignore[attr-defined]
        session.run_start(num_steps=SESSION_CALL["num_steps"], host="bench")
        served = call.with_(**SESSION_CALL)

        def fn() -> torch.Tensor:
            with torch.inference_mode():
                return session.attention(q, k, v, served)

        def describe() -> dict[str, Any]:
            """What served the row: the fused plan or the PyTorch path (and why), the session's fallbacks."""
            layer = ttr.layers[call.layer_key]
            entries = list(layer.serve_cache.entries.values())  # type: ignore[union-attr]
            path = "fused" if entries and entries[-1].plan is not None else "pytorch"
            info: dict[str, Any] = {"served_by": path, "fallbacks": dict(session.stats[call.layer_key].fallbacks)}
            if entries and entries[-1].reasons:
                info["pytorch_because"] = "; ".join(entries[-1].reasons)
            return info
        fn.describe = describe  # type: ignore[attr-defined]
        return fn
    return make


def _require_tma(plan: Any, first_call: Callable[[], Any]) -> None:
    """Run a plan built with landmark_impl 'tma' once and raise where it did not keep it (declined the call, or its
    kernel failed: the row would time the in-kernel softmax under the TMA row's name)."""
    if plan.landmark_impl == "tma":
        first_call()
    if plan.landmark_impl != "tma":
        raise RuntimeError("the TMA-fed landmark softmax does not serve this call here (the log says why)")


def _exact_fp8(backend: Any, lm_backend: Any, q: torch.Tensor) -> bool:
    """Whether the bare kernels run the exact branch in e4m3, as the served layer of this configuration does."""
    return lm_backend is not None and backend.exact_fp8(lm_backend, q.device)


def _joint_fused_maker(backend: Any, lm_backend: Any, call: Any, win: int, s: Shape,
                       landmark_impl: str = "auto") -> Callable:
    """The joint layer's bare kernels: a `JointServePlan` built once (the landmark backend's exact set and window,
    as the served layer builds it), timed alone."""
    def make(q, k, v):
        from ..plugins.ttr.kernels import JointServePlan, PhiWeights, fused_unsupported_reasons

        layer = _bench_layer(backend, call, q)
        st = backend.settings
        pq = PhiWeights.from_module(layer.phi_q, st.activation, st.l2_norm, st.eps)
        pk = PhiWeights.from_module(layer.phi_k or layer.phi_q, st.activation, st.l2_norm, st.eps)
        idx, _ = lm_backend.indices(k, call)
        window, grid = (win, s.grid) if win and s.grid is not None else (0, None)
        with torch.no_grad():
            reasons = fused_unsupported_reasons(q, k, v, pq, pk, None, idx, window)
            if reasons:
                raise RuntimeError("the fused path cannot serve this call: " + "; ".join(reasons))
            plan = JointServePlan(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=layer.alpha_logit.detach(),
                                  log_scale_q=layer.log_scale_q.detach(), eps=st.eps, window=window, grid=grid,
                                  n_cond=s.txt, landmark_prefix=call.cond_in(k.shape[2]),
                                  landmark_impl=landmark_impl, exact_fp8=_exact_fp8(backend, lm_backend, q))
        if landmark_impl == "tma":
            _require_tma(plan, lambda: plan(q, k, v))
        return lambda: plan(q, k, v)
    return make


def _ttr_variants(s: Shape, dtype: torch.dtype, device: torch.device, configs: list[str] | None = None,
                  graphs: bool = True) -> list[Variant]:
    """Per TTR_CONFIGS entry: the PyTorch path; the product path through the session (`session ttr-<config>`, the
    headline, and with a device sync per call for the non-finite check, `… every-call`) checked against it; the
    bare kernels from a plan built once (auto / in-kernel / SDPA landmarks, the same with the device-side finite
    guard) checked against it; kernel-only (once per distinct φ: configs that differ only in landmarks share it)
    and, with `graphs`, a CUDA-graph replay of each fused and session variant. Landmark indices always come from
    the landmark backend (`indices()`), the same selection the served layer uses."""
    res: list[Variant] = []
    names = list(TTR_CONFIGS) if configs is None else configs
    bad = unknown_configs(names)
    if bad:
        raise ValueError(f"unknown ttr configuration(s) {bad}{renamed_hint(bad)}; expected some of "
                         f"{list(TTR_CONFIGS)}")
    kernel_only_done: dict[tuple, str] = {}  # φ settings -> the config whose kernel-only variant times it
    for cfg in names:
        tset, lset = TTR_CONFIGS[cfg]
        call = _call(s, "double:0" if is_joint(tset) else "single:0")
        try:
            # kernel="torch": the reference row is the PyTorch path even on CUDA ("auto" would serve it with
            # the fused kernels, and the fused rows would be checked against themselves)
            backend, backends = _build_backend("ttr", {**tset, "feature_precision": "input", "kernel": "torch"}, lset)
        except Exception as exc:  # noqa: BLE001
            res.append(Variant(f"ttr-{cfg}", "ttr", lambda q, k, v: (lambda: q), (0, 0),
                               f"cannot build ttr standalone: {type(exc).__name__}: {exc}"))
            continue
        cost = _ttr_cost_from_settings(s, dtype, backend)
        lm_backend = backends.get("landmark") if "landmark" in backends else None
        n_l = lm_backend.count(s.n, s.txt) if lm_backend is not None else 0
        win = _lm_window(lm_backend)
        notes = {"settings": tset, "landmarks": lset, "n_landmarks": n_l}
        if win:
            notes.update(window=win, latent_grid=s.grid)
        torch_name = f"ttr-{cfg} torch"

        def make_torch(q, k, v, backend=backend, call=call):
            _bench_layer(backend, call, q)

            def fn():
                with torch.inference_mode():
                    return backend.forward(q, k, v, call)
            return fn
        res.append(Variant(torch_name, "ttr", make_torch, cost, None, notes=notes))
        served = [Variant(f"session ttr-{cfg}", "ttr", _session_maker(tset, lset, backend, call, "per_step"), cost,
                          None, check_against=torch_name, notes={**notes, "product_path": True}),
                  Variant(f"session ttr-{cfg} every-call", "ttr",
                          _session_maker(tset, lset, backend, call, "every_call"), cost, None,
                          check_against=torch_name, notes={**notes, "product_path": True})]
        res += served
        if is_joint(tset):
            res.append(Variant(f"ttr-{cfg} fused", "ttr", _joint_fused_maker(backend, lm_backend, call, win, s), cost,
                               None, check_against=torch_name, notes=notes))
            res.append(Variant(f"ttr-{cfg} fused tma-lm", "ttr",
                               _joint_fused_maker(backend, lm_backend, call, win, s, "tma"), cost, None,
                               check_against=torch_name, notes=notes))
            if graphs:
                res.append(graph_variant(served[0], device))
            continue

        def fused_maker(lm_impl: str | None, guarded: bool = False, backend=backend, lm_backend=lm_backend, win=win,
                        call=call):
            def make(q, k, v):
                from ..plugins.ttr.kernels import PhiWeights, ServePlan, fused_unsupported_reasons

                layer = _bench_layer(backend, call, q)
                st = backend.settings
                pq = PhiWeights.from_module(layer.phi_q, st.activation, st.l2_norm, st.eps)
                pk = PhiWeights.from_module(layer.phi_k or layer.phi_q, st.activation, st.l2_norm, st.eps)
                idx = None
                if lm_impl is not None and lm_backend is not None:
                    idx, _ = lm_backend.indices(k, call)  # the landmark plugin's own selection, on k's device
                # the landmark window as the served layer runs it (plugins/ttr/backend.py: grid from the call)
                wkw = {}
                if lm_impl is not None and win and s.grid is not None:
                    wkw = {"window": win, "grid": s.grid, "n_cond": s.txt}
                with torch.no_grad():
                    reasons = fused_unsupported_reasons(q, k, v, pq, pk, None, idx, wkw.get("window", 0))
                    if reasons:
                        raise RuntimeError("the fused path cannot serve this call: " + "; ".join(reasons))
                    # built once, as the served layer keeps it: the row times the launches alone
                    plan = ServePlan(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=layer.alpha_logit.detach(),
                                     alpha_max=st.alpha_max, gamma=st.gamma, adaptive=st.adaptive_alpha, eps=st.eps,
                                     landmark_impl=lm_impl or "auto", d_reference=layer.running_reference(),
                                     landmark_prefix=call.cond_in(k.shape[2]),
                                     exact_fp8=lm_impl is not None and _exact_fp8(backend, lm_backend, q), **wkw)
                flag = torch.zeros(1, dtype=torch.int32, device=q.device) if guarded else None
                if lm_impl == "tma":
                    _require_tma(plan, lambda: plan(q, k, v))
                return lambda: plan(q, k, v, finite_flag=flag)
            return make

        fused = [Variant(f"ttr-{cfg} fused", "ttr", fused_maker("auto"), cost, None, check_against=torch_name,
                         notes=notes),
                 Variant(f"ttr-{cfg} fused guarded", "ttr", fused_maker("auto", guarded=True), cost, None,
                         check_against=torch_name, notes={**notes, "finite_guard": True}),
                 Variant(f"ttr-{cfg} fused flash-lm", "ttr", fused_maker("fused"), cost, None,
                         check_against=torch_name, notes=notes),
                 Variant(f"ttr-{cfg} fused sdpa-lm", "ttr", fused_maker("sdpa"), cost, None,
                         check_against=torch_name, notes=notes),
                 Variant(f"ttr-{cfg} fused tma-lm", "ttr", fused_maker("tma"), cost, None,
                         check_against=torch_name, notes=notes)]
        st = backend.settings
        phi_key = (st.depth, st.hidden_for(s.d) if st.depth > 1 else 0, st.feature_dim, st.activation, st.l2_norm,
                   st.per_head, st.split_qk)
        if phi_key not in kernel_only_done:
            kernel_only_done[phi_key] = cfg
            kcost = (cost[0] - 4.0 * s.b * s.h * s.n * n_l * s.d, cost[1])
            fused.append(Variant(f"ttr-{cfg} fused kernel-only", "ttr", fused_maker(None), kcost, None,
                                 notes={**notes, "kernel_only": True}))
        else:
            notes["kernel_only_as"] = f"ttr-{kernel_only_done[phi_key]} fused kernel-only"
        res += fused
        if graphs:
            res += [graph_variant(var, device) for var in served[:1] + fused]
    return res


def _external_variants(s: Shape, dtype: torch.dtype, device: torch.device) -> list[Variant]:
    res = []
    cost = exact_cost(s, dtype)
    if importlib.util.find_spec("sageattention") is not None and device.type == "cuda":
        def make_sage(q, k, v):
            from sageattention import sageattn
            return lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
        res.append(Variant("sageattention", "external", make_sage, cost))
    if importlib.util.find_spec("flash_attn") is not None and device.type == "cuda":
        def make_fa(q, k, v):
            from flash_attn import flash_attn_func
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # it wants [B, N, H, D]
            return lambda: flash_attn_func(qt, kt, vt)
        res.append(Variant("flash-attn (BNHD inputs)", "external", make_fa, cost))
    return res
