"""`attnplug bench-model`: one forward of a FLUX.1-dev-shaped transformer, per attention mode (the
end-to-end number).

`bench.run` times one attention layer; what a user feels is the whole denoiser step, of which attention
is only a part (on FLUX.1-dev ~14 % of a forward at 1024², ~38 % at 2048²). This module builds a
diffusers `FluxTransformer2DModel` with the real FLUX.1-dev config and RANDOM weights (timing only:
the outputs mean nothing) directly on the device in bf16 — one copy, ~24 GB for the 11.9 B
parameters — and times one forward (batch 1, 512 text tokens, (px/16)² image tokens) in these modes:

- `native`  — no attnplug (diffusers' own processors and dispatcher);
- `host`    — attnplug applied, every call served by the `host` backend (diffusers' own kernel through
  attnplug's processors): the plugin's overhead; bit-identical to native;
- `sdpa`    — attnplug applied, every call served by the session's `sdpa` backend;
- `ttr-0`, `ttr-50`, `ttr-100` — `backend = "ttr"` with a `layers` gate letting ttr serve 0 %, the
  first half (`single:0-18` for FLUX.1-dev) or all of the single-block layers; every single-block
  layer is marked ready; φ weights are random (fresh layers), which is fine for timing. On CUDA the
  ttr kernel defaults to `triton` (the fused path `kernel = "auto"` picks there, but an error instead
  of a silent PyTorch fallback) and the session is strict, so a row either measures ttr serving
  exactly the intended layers or says why not.
- `ttr-all` — ttr on every layer: the joint layer (`joint_layers = ["double:*"]`: every interaction with text
  tokens exact) on the double blocks, the default layer on the single blocks, all marked ready.

Options after a mode, `/`-separated (e.g. `ttr-100/graph`, `native/compile`): `every-call` — the non-finite
check with a device sync per call (`finite_check = "every_call"`; the default reads device flags once per step);
`compile` — the model under `torch.compile(mode="reduce-overhead")` (graph breaks at the attention calls, the
pieces between them in CUDA graphs; the warm-up forwards compile); `graph` — after the warm-up forwards, one whole
forward captured in a CUDA graph (`torch.cuda.graph`) and replayed (CUDA only; a capture fails on any sync);
`fbcache` — diffusers' First Block Cache on the model, every forward after the first one a cached step (the inputs
do not change, so the first block's residual does not either): the row times a step the cache skips (the first
block, and the cached residual added), to combine with the share of steps skipped that `attnplug eval
--step-cache` measures on the testbed (not with /compile or /graph).

Per mode: warm-up forwards (they build the ttr layers and compile the kernels), then the median of
per-forward CUDA-event timings (host clock on CPU) under `torch.inference_mode()`, synchronised before
and after; peak device memory of the timed forwards (absolute and beyond what was allocated before
them); relative error of the output against native (same weights, same inputs); and, from
`session.stats`, how many attention calls each backend served per forward and which layers ttr
served; the host time to enqueue one forward (wall time of the Python call, the GPU running behind it); on CUDA,
the device syncs of one more forward, in all and inside `Session.attention` (`count_syncs`). Prints a table, writes JSON
with `--json`. `--smoke` is a tiny config (1 double + 2 single blocks, 2 heads × 32) that runs on a CPU
in seconds. Entry points: `main(argv)`, `run_bench_model`.

`--context-parallel ulysses|ring` (in a torchrun job, one rank per GPU): the model under diffusers' context
parallelism (`enable_parallelism` before attnplug's `apply`, `bench/context_parallel.py`): `native` is exact attention
through diffusers' own context-parallel kernel, `ttr-100` serves the single blocks with sequence-parallel ttr (the
double blocks stay on that kernel). Rank 0 prints and writes the report; `bench/multi_gpu.py` runs 1, 2 and 4 GPUs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .run import environment, kernel_config, time_calls
from .variants import capture_graph, give_stand_in_reference

#: diffusers `FluxTransformer2DModel` config of black-forest-labs/FLUX.1-dev (11.9 B parameters).
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56)}
#: A tiny config of the same family for CPU smoke runs (RoPE axes sum to the head dim).
SMOKE: dict[str, Any] = {
    "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 32,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
    "axes_dims_rope": (8, 12, 12)}

MODES = ("native", "host", "sdpa", "ttr-0", "ttr-50", "ttr-100", "ttr-all")
#: ttr on every layer: the joint layer on the double blocks, the hybrid layer on the single blocks
ALL_LAYERS = "ttr-all"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIGMA, GUIDANCE = 0.5, 3.5  # what the transformer is told about the step (attnplug reads both)
NOTE = ("random transformer weights and random (untrained) ttr feature maps: timings only; outputs are "
        "not images and the ttr rows' errors say nothing about quality")


# ---- model and inputs ------------------------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default float dtype (so modules are born in `dtype`, no fp32 copy)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A `FluxTransformer2DModel` with diffusers' own random init, constructed directly on `device` in `dtype`.

    Constructing under `torch.device(device)` with the default dtype set allocates every parameter
    once, where it will live (no CPU copy, no fp32 copy): ~24 GB for FLUX.1-dev in bf16.
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = FluxTransformer2DModel(**config)
    return model.eval().requires_grad_(False)


def image_ids(side: int, device: torch.device) -> torch.Tensor:
    """Flux image position ids `[side², 3]`, rows `(0, row, col)` (as FluxPipeline builds them)."""
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return ids.reshape(side * side, 3).to(device)


def make_inputs(config: dict[str, Any], px: int, txt: int, batch: int, device: torch.device,
                dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The keyword arguments of one transformer call, as FluxPipeline passes them (timestep = sigma).

    Drawn on the CPU from a seeded generator, then moved: the same on every device.
    """
    if px % 16:
        raise ValueError(f"image size {px}: must be a multiple of 16 (8x VAE, 2x2 packing)")
    side = px // 16
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, Any] = {
        "hidden_states": torch.randn(batch, side * side, config["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(batch, txt, config["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=g),
    }
    inputs = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
    inputs["timestep"] = torch.full((batch,), SIGMA, device=device, dtype=dtype)
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), GUIDANCE, device=device, dtype=torch.float32)
    inputs["img_ids"] = image_ids(side, device)
    inputs["txt_ids"] = torch.zeros(txt, 3, device=device)
    inputs["return_dict"] = False
    return inputs


# ---- modes -----------------------------------------------------------------------------------------
OPTIONS = ("every-call", "compile", "graph", "fbcache")


def parse_mode(mode: str) -> tuple[str, frozenset[str]]:
    """`'ttr-100/graph'` → `('ttr-100', {'graph'})`; ValueError naming what is expected."""
    base, *opts = mode.split("/")
    bad = [o for o in opts if o not in OPTIONS]
    if (bad or (base not in MODES and ttr_share(base) is None)
            or len({"compile", "graph", "fbcache"} & set(opts)) > 1):
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)} (or ttr-N for N % of the single "
                         f"blocks), optionally followed by /every-call and one of /compile, /graph, /fbcache")
    return base, frozenset(opts)


def native_of(mode: str) -> str:
    """The native row a mode is compared with: `native` with the same /compile or /graph."""
    _, options = parse_mode(mode)
    return "/".join(["native", *sorted(options & {"compile", "graph"})])


def ttr_share(mode: str) -> int | None:
    """The percentage of single-block layers a `ttr-N` mode serves, None for other modes."""
    m = re.fullmatch(r"ttr-(\d+)(/.*)?", mode)
    if m is None:
        return None
    pct = int(m[1])
    if not 0 <= pct <= 100:
        raise ValueError(f"mode {mode!r}: the ttr share must be 0..100 %")
    return pct


def ttr_include(pct: int, n_single: int) -> list[str]:
    """Layer patterns of the first `pct` % of the single blocks: [] / ['single:0-18'] / ['single:*']."""
    n = round(n_single * pct / 100)
    if n <= 0:
        return []
    if n >= n_single:
        return ["single:*"]
    return [f"single:0-{n - 1}"]


def mode_config(mode: str, n_single: int, ttr_kernel: str,
                plugins: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The attnplug config (a dict for `load_config`) of a mode; None for `native`."""
    name, options = parse_mode(mode)
    if name == "native":
        return None
    base: dict[str, Any] = {"exact": "host", "loggers": [], "plugins": {k: dict(v) for k, v in (plugins or {}).items()}}
    if "every-call" in options:  # the non-finite check with a device sync per call (the default: flags per step)
        base["finite_check"] = "every_call"
    if name in ("host", "sdpa"):
        return {**base, "backend": name}
    base["plugins"].setdefault("ttr", {}).setdefault("kernel", ttr_kernel)
    if name == ALL_LAYERS:
        base["plugins"]["ttr"].setdefault("joint_layers", ["double:*"])
        return {**base, "backend": "ttr", "strict": True,
                "gates": [{"kind": "layers", "include": ["double:*", "single:*"]}]}
    pct = ttr_share(name)
    assert pct is not None
    # strict: a ttr row measures ttr on exactly the gated layers, or fails with the reason
    return {**base, "backend": "ttr", "strict": True,
            "gates": [{"kind": "layers", "include": ttr_include(pct, n_single)}]}


def ttr_layer(plugins: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The layer the `ttr-N` modes serve: the product default (`[plugins.ttr]` / `[plugins.landmark]`
    defaults) with `plugins`' overrides — the settings that define it, recorded in the report."""
    from ..core.config import load_config

    cfg = load_config({"backend": "ttr", "loggers": [], "plugins": {k: dict(v) for k, v in (plugins or {}).items()}})
    t, lm = cfg.section("ttr"), cfg.section("landmark")
    return {"ttr": t.model_dump(include={"depth", "hidden", "feature_dim", "activation", "alpha_max", "alpha_reference"}),
            "landmark": None if lm is None else lm.model_dump(include={"fraction", "min", "max", "window"})}


def compress_keys(keys: list[str]) -> str:
    """`['single:0', 'single:1', 'single:2', 'double:4']` → `'double:4, single:0-2'`."""
    from ..core.patterns import collapse_layer_keys

    return ", ".join(collapse_layer_keys(keys))


# ---- timing ----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def sdpa_kernel(name: str, device: torch.device) -> Iterator[None]:
    """Restrict torch SDPA to one backend for everything in the block (`default`: torch's own choice)."""
    if name == "default" or device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as _kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    with _kernel([backends[name]]):
        yield


def count_syncs(fn: Callable[[], object], session: Any = None) -> tuple[int, int]:
    """How many times `fn` makes the host wait for the GPU (torch's sync debug mode, CUDA only): in all, and inside
    `session.attention` (the served calls; 0 without a session).

    Each sync drains the queue: the GPU then idles while Python prepares the next kernels, so a sync per
    attention call adds the host's time per layer to the forward (docs/PERFORMANCE.md)."""
    spans: list[tuple[int, int]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if session is not None:
            real = session.attention

            def attention(*args: Any, **kwargs: Any) -> Any:
                start = len(caught)
                try:
                    return real(*args, **kwargs)
                finally:
                    spans.append((start, len(caught)))
            session.attention = attention  # the processors call `session.attention` at every call
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            if session is not None:
                del session.attention
    syncs = [("synchronizing" in str(w.message)) for w in caught]
    return sum(syncs), sum(sum(syncs[a:b]) for a, b in spans)


# ---- one mode --------------------------------------------------------------------------------------
@dataclass
class Row:
    size: str
    mode: str
    n_image: int
    n_txt: int
    ms: float | None = None
    ms_spread: tuple[float, float] | None = None  # fastest and slowest timed forward
    times_ms: list[float] = field(default_factory=list)
    x_native: float | None = None  # native ms / this ms (> 1: faster than native)
    x_native_of: str | None = None  # the native row of that ratio: with the same /compile or /graph, where timed
    peak_mib: float | None = None  # peak allocated during the timed forwards (weights included)
    peak_extra_mib: float | None = None  # that peak minus what was allocated before them
    syncs_per_forward: int | None = None  # device syncs in one forward after the timed ones (CUDA only)
    syncs_in_attention: int | None = None  # … of them inside Session.attention (the served calls)
    host_ms: float | None = None  # median wall time of the Python call of one forward (the GPU running behind it)
    warmup_s: float | None = None  # the warm-up forwards (and, for /compile and /graph, compiling or capturing)
    rel_err_vs_native: float | None = None
    rel_err_vs_eager: float | None = None  # /graph: the replayed forward against the eager one of the same mode
    forwards: int = 0
    served_per_forward: dict[str, float] = field(default_factory=dict)  # backend → attention calls per forward
    served_layers: dict[str, str] = field(default_factory=dict)  # backend → layers it served (compressed)
    fallbacks: dict[str, int] = field(default_factory=dict)
    ttr_include: list[str] | None = None
    skipped: str | None = None  # why the mode has no time
    warning: str | None = None


def served_summary(session: Any, forwards: int) -> tuple[dict[str, float], dict[str, str], dict[str, int]]:
    """From `session.stats`: calls per forward by backend, the layers each backend served, fallbacks."""
    calls: dict[str, int] = {}
    layers: dict[str, list[str]] = {}
    fallbacks: dict[str, int] = {}
    for key, st in session.stats.items():
        for backend, n in st.served.items():
            calls[backend] = calls.get(backend, 0) + n
            layers.setdefault(backend, []).append(key)
        for reason, n in st.fallbacks.items():
            fallbacks[reason] = fallbacks.get(reason, 0) + n
    per_forward = {b: n / max(forwards, 1) for b, n in sorted(calls.items())}
    return per_forward, {b: compress_keys(k) for b, k in sorted(layers.items())}, fallbacks


def run_mode(model: Any, inputs: dict[str, Any], mode: str, row: Row, device: torch.device, n_single: int,
             reference: torch.Tensor | None, warmup: int, reps: int, ttr_kernel: str, sdpa: str,
             plugins: dict[str, dict[str, Any]] | None = None, n_double: int = 0) -> torch.Tensor | None:
    """Time `mode` on `model` into `row`; returns the output of the first forward (on the CPU, fp32)."""
    from ..core import Session
    from ..hosts.diffusers import apply

    _, options = parse_mode(mode)
    cfg = mode_config(mode, n_single, ttr_kernel, plugins)
    session = handle = None
    forwards = 0
    target = model
    stack = contextlib.ExitStack()

    def forward() -> torch.Tensor:
        nonlocal forwards
        forwards += 1
        return target(**inputs)[0]

    try:
        if ("compile" in options or "graph" in options) and device.type != "cuda":
            raise RuntimeError(f"mode {mode!r} needs CUDA (CUDA graphs)")
        if "fbcache" in options:
            cache = stack.enter_context(first_block_cache(model))
            target = cache
        if cfg is not None:
            session = Session(cfg)
            if session.config.root.backend == "ttr":
                row.ttr_include = list(cfg["gates"][0]["include"])
                ttr = session.backends.get("ttr")
                keys = [f"single:{i}" for i in range(n_single)]  # every single block may serve; the gate picks
                if parse_mode(mode)[0] == ALL_LAYERS:
                    keys += [f"double:{i}" for i in range(n_double)]
                for key in keys:
                    ttr.ready[key] = True  # type: ignore[attr-defined]
            handle = apply(model, session)
            session.run_start(num_steps=1, host="diffusers", pipeline="attnplug bench-model")
        if "compile" in options:
            import torch._dynamo as dynamo

            # one frame per block kind, each re-entered after every attention call: room for all of them
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 256)
            target = torch.compile(model, mode="reduce-overhead")
        with torch.inference_mode(), sdpa_kernel(sdpa, device):
            t0 = time.perf_counter()
            out = forward().float().cpu()  # first forward: builds ttr layers, compiles kernels
            extra_warmup = max(warmup - 1, 0)
            if session is not None and session.config.root.backend == "ttr":
                ttr = session.backends.get("ttr")
                for layer in ttr.layers.values():  # built by that forward
                    give_stand_in_reference(layer, ttr.settings, device)
                # the reference changes the served kernel (one-pass α): one more untimed forward builds and
                # compiles it, so the timed forwards do not include Triton's compile
                extra_warmup = max(extra_warmup, 1)
            if not bool(torch.isfinite(out).all()):
                row.warning = "non-finite output (random weights): the time stands, the error column does not"
            if reference is not None:
                row.rel_err_vs_native = float((out - reference).norm() / reference.norm().clamp_min(1e-30))
            for _ in range(extra_warmup):
                forward()
            timed: Callable[[], object] = forward
            if "graph" in options:
                _sync(device)
                torch.cuda.empty_cache()
                timed = capture_graph(forward, device, warmup=1)
                replayed = timed().float().cpu()  # type: ignore[union-attr]
                row.rel_err_vs_eager = float((replayed - out).norm() / out.norm().clamp_min(1e-30))
            _sync(device)
            row.warmup_s = time.perf_counter() - t0
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            times = time_calls(timed, device, reps)
            row.host_ms = host_ms(timed, device, reps)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                row.peak_mib = peak / 2 ** 20
                row.peak_extra_mib = (peak - base) / 2 ** 20
                row.syncs_per_forward, row.syncs_in_attention = count_syncs(timed, session)
        row.times_ms = times
        row.ms = statistics.median(times)
        row.ms_spread = (min(times), max(times))
        return out
    except torch.cuda.OutOfMemoryError as exc:  # type: ignore[attr-defined]
        row.skipped = f"out of memory: {str(exc).splitlines()[0]}"
        return None
    except Exception as exc:  # noqa: BLE001 - one failing mode must not lose the other rows
        row.skipped = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return None
    finally:
        row.forwards = forwards
        stack.close()
        if session is not None:
            if handle is not None:
                handle.remove()  # ends the run too
            row.served_per_forward, row.served_layers, row.fallbacks = served_summary(session, forwards)
            session.close()
        if "compile" in options:
            import torch._dynamo as dynamo

            dynamo.reset()  # the next mode runs the model as it is
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def first_block_cache(model: Any) -> Iterator[Callable[..., Any]]:
    """diffusers' First Block Cache on `model` (threshold 1e9: every forward after the first skips the blocks after
    the first); yields a callable that runs `model(**inputs)` inside the cache context; the hooks come off after."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=1e9))

    def call(**inputs: Any) -> Any:
        with model.cache_context("cond"):
            return model(**inputs)
    try:
        yield call
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=True)
        registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)


def host_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time (ms) of the Python call `fn()` — what the host spends to enqueue it — each call started on
    an idle GPU (synchronised before, not after: the GPU runs behind the host)."""
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return statistics.median(times)


# ---- the run ---------------------------------------------------------------------------------------
def run_bench_model(sizes: list[int], modes: list[str], device: torch.device, dtype: torch.dtype = torch.bfloat16,
                    config: dict[str, Any] | None = None, txt: int = 512, batch: int = 1, warmup: int = 3,
                    reps: int = 10, ttr_kernel: str | None = None, sdpa: str = "default", seed: int = 0,
                    plugins: dict[str, dict[str, Any]] | None = None,
                    log: Callable[[str], None] = print, context_parallel: str | None = None,
                    attention_backend: str = "native") -> dict[str, Any]:
    """Build the model once, then time every mode at every image size; returns the JSON-able report.

    `context_parallel` ("ulysses" / "ring", in a torchrun job: `context_parallel.start` first): the model under
    diffusers' context parallelism over every rank, `attention_backend` its kernel; `native` then times exact
    attention through diffusers' context-parallel kernel, the attnplug modes serve ttr sharded."""
    cfg = dict(config or FLUX_DEV)
    for mode in modes:
        mode_config(mode, cfg["num_single_layers"], "auto")  # reject unknown modes before the model is built
        if context_parallel and parse_mode(mode)[1] - {"every-call"}:
            raise ValueError(f"mode {mode!r}: /compile, /graph and /fbcache are not timed under context parallelism")
    kernel = ttr_kernel or ("triton" if device.type == "cuda" else "torch")
    t0 = time.perf_counter()
    model = build_transformer(cfg, device, dtype, seed)
    parallel = None
    if context_parallel:
        from .context_parallel import enable

        parallel = enable(model, context_parallel, attention_backend)  # before attnplug's apply (run_mode)
    _sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"built FluxTransformer2DModel ({_count(n_params)} parameters, {dtype}) on {device} "
        f"in {time.perf_counter() - t0:.1f} s")
    ordered = sorted(modes, key=lambda m: m != "native")  # native first: the other rows' error reference
    rows: list[Row] = []
    for px in sizes:
        inputs = make_inputs(cfg, px, txt, batch, device, dtype, seed)
        n_img = inputs["hidden_states"].shape[1]
        reference: torch.Tensor | None = None
        size_rows: dict[str, Row] = {}
        for mode in ordered:
            row = Row(f"{px}²", mode, n_img, txt)
            out = run_mode(model, inputs, mode, row, device, cfg["num_single_layers"], reference, warmup, reps,
                           kernel, sdpa, plugins, n_double=cfg["num_layers"])
            if mode == "native":
                reference = out
            size_rows[mode] = row
            log(f"  {row.size:>7} {mode:<22} " + (f"{row.ms:10.2f} ms" if row.ms is not None else "") +
                (f"  skipped: {row.skipped}" if row.skipped else ""))
        for row in size_rows.values():
            base = size_rows.get(native_of(row.mode))
            if base is not None and base.ms and row.ms:
                row.x_native, row.x_native_of = base.ms / row.ms, base.mode
        rows += size_rows.values()
        del inputs
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"env": environment(device, ("diffusers", "triton")), "model": {**cfg, "axes_dims_rope": list(cfg["axes_dims_rope"]),
                                                  "parameters": n_params, "dtype": str(dtype).removeprefix("torch.")},
            "settings": {"txt_tokens": txt, "batch": batch, "warmup": warmup, "reps": reps, "ttr_kernel": kernel,
                         "sdpa_kernel": sdpa, "sigma": SIGMA, "guidance": GUIDANCE, "plugins": plugins or {},
                         "seed": seed, "ttr_layer": ttr_layer(plugins)},
            "parallel": parallel, "note": NOTE, "results": [asdict(r) for r in rows]}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def format_table(report: dict[str, Any]) -> str:
    """Fixed-width table: ms per forward, ratio to native, peak memory, error vs native, what served."""
    lines = [(f"{'size':>7} {'tokens':>13} {'mode':<22} {'ms':>9} {'spread':>15} {'x native':>8} {'peak GiB':>8} "
             f"{'+act GiB':>8} {'err/nat':>8}  served per forward")]
    for r in report["results"]:
        tokens = f"{r['n_txt']}+{r['n_image']}"
        served = ", ".join(f"{b} {n:g}" for b, n in r["served_per_forward"].items()) or "diffusers"
        if r["ttr_include"] is not None:
            served += f"; ttr layers: {r['served_layers'].get('ttr', 'none')} (gate {r['ttr_include']})"
        if r["fallbacks"]:
            served += f"; FALLBACKS {r['fallbacks']}"
        if r["ms"] is None:
            lines.append(f"{r['size']:>7} {tokens:>13} {r['mode']:<22} skipped: {r['skipped']}  [{served}]")
            continue
        spread = f"{r['ms_spread'][0]:.1f}-{r['ms_spread'][1]:.1f}"
        x = f"{r['x_native']:8.3f}" if r["x_native"] is not None else f"{'-':>8}"
        peak = f"{r['peak_mib'] / 1024:8.2f}" if r["peak_mib"] is not None else f"{'-':>8}"
        extra = f"{r['peak_extra_mib'] / 1024:8.2f}" if r["peak_extra_mib"] is not None else f"{'-':>8}"
        err = f"{r['rel_err_vs_native']:8.1e}" if r["rel_err_vs_native"] is not None else f"{'-':>8}"
        flag = f"  ({r['warning']})" if r["warning"] else ""
        if r.get("syncs_per_forward") is not None:
            served += (f"; {r['syncs_per_forward']} device syncs per forward, {r.get('syncs_in_attention')} in "
                       "Session.attention")
        if r.get("host_ms") is not None:
            served += f"; host {r['host_ms']:.1f} ms per forward"
        if r.get("x_native_of") not in (None, "native"):
            served += f"; x vs {r['x_native_of']}"
        lines.append(f"{r['size']:>7} {tokens:>13} {r['mode']:<22} {r['ms']:9.2f} {spread:>15} {x} {peak} {extra} "
                     f"{err}  {served}{flag}")
    m, s = report["model"], report["settings"]
    lines.append(f"model: {m['num_layers']} double + {m['num_single_layers']} single blocks, "
                 f"{m['num_attention_heads']}x{m['attention_head_dim']}, {_count(m['parameters'])} params, "
                 f"{m['dtype']}; median of {s['reps']} forwards after {s['warmup']} warm-up; ttr kernel "
                 f"{s['ttr_kernel']}; SDPA {s['sdpa_kernel']}")
    if s.get("ttr_layer"):
        lines.append(f"ttr layer: {s['ttr_layer']['ttr']}, landmarks {s['ttr_layer']['landmark']}")
    if report.get("parallel"):
        p = report["parallel"]
        lines.append(f"context parallelism: {p['kind']} over {p['world']} ranks, diffusers backend "
                     f"{p['attention_backend']}")
    lines.append(f"note: {report['note']}")
    lines.append(f"env: {report['env']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line of `attnplug bench-model`; returns the exit status."""
    p = argparse.ArgumentParser(prog="attnplug bench-model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma list of image sides in pixels (multiples of 16); "
                                                 "default 1024,2048 (--smoke: 128,256)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (ttr-N: N %% of "
                                                           "the single blocks), each optionally followed by "
                                                           "/every-call (a device sync per call for the non-finite "
                                                           "check) and /compile or /graph")
    p.add_argument("--reps", type=int, default=None, help="timed forwards per mode, median reported (default 10; "
                                                          "--smoke: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed forwards per mode before timing, >= 1 "
                                                            "(default 3; --smoke: 1)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--txt", type=int, default=None, help="text tokens (default 512; --smoke: 16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ttr-kernel", default=None, choices=("auto", "torch", "triton"),
                   help="[plugins.ttr] kernel (default: triton on CUDA, torch on CPU)")
    p.add_argument("--sdpa", default="default", choices=("default", "cudnn", "flash", "efficient", "math"),
                   help="restrict torch SDPA to one backend in every mode (default: torch's own choice)")
    p.add_argument("--plugins", default=None,
                   help='JSON of [plugins.*] sections for the attnplug modes, e.g. \'{"landmark": {"max": 1024}}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny config (1 double + 2 single blocks, 2 heads x 32) "
                                                        "that runs on a CPU in seconds")
    p.add_argument("--context-parallel", default=None, choices=("ulysses", "ring"),
                   help="diffusers' context parallelism over the ranks of a torchrun job (enable_parallelism before "
                        "attnplug's apply); rank 0 prints and writes the report")
    p.add_argument("--attention-backend", default="native",
                   help="diffusers' attention backend under --context-parallel (default native)")
    p.add_argument("--kernel-config", default=None, metavar="JSON",
                   help="fused kernels' tiles changed for this run, e.g. '{\"lm_direct\": 2}' (KernelConfig fields)")
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)
    if a.context_parallel:
        from . import context_parallel as cp

        device, started = cp.start(a.device)
        try:
            return _main(a, argv, device, cp.rank_world()[0] == 0)
        finally:
            cp.stop(started)
    return _main(a, argv, torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu")), True)


def _main(a: argparse.Namespace, argv: list[str] | None, device: torch.device, report_here: bool) -> int:
    """`main` after the arguments and the device: run, print and write the report (`report_here`: this rank)."""
    config = SMOKE if a.smoke else FLUX_DEV
    txt = a.txt if a.txt is not None else (16 if a.smoke else 512)
    try:
        sizes = [int(s) for s in (a.sizes or ("128,256" if a.smoke else "1024,2048")).split(",") if s.strip()]
        for s in sizes:
            if s <= 0 or s % 16:
                raise ValueError(f"--sizes: {s} is not a positive multiple of 16")
        tiles = kernel_config(a.kernel_config)
        modes = [m.strip() for m in a.modes.split(",") if m.strip()]
        for m in modes:
            mode_config(m, config["num_single_layers"], "auto")
        plugins = json.loads(a.plugins) if a.plugins else None
        if plugins is not None and not isinstance(plugins, dict):
            raise ValueError("--plugins: expected a JSON object of sections")
        reps = a.reps if a.reps is not None else (3 if a.smoke else 10)
        warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
        if reps < 1 or warmup < 1:
            raise ValueError("--reps and --warmup must be >= 1")
        if a.context_parallel and any(parse_mode(m)[1] - {"every-call"} for m in modes):
            raise ValueError("--context-parallel: /compile, /graph and /fbcache are not timed under context "
                             "parallelism")
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"attnplug bench-model: {exc}", file=sys.stderr)
        return 2
    from ..plugins.ttr.kernels.tiles import using_config

    with using_config(tiles):
        report = run_bench_model(sizes, modes, device, DTYPES[a.dtype], config, txt, a.batch, warmup, reps,
                                 a.ttr_kernel, a.sdpa, a.seed, plugins,
                                 log=(lambda s: print(s, file=sys.stderr, flush=True)) if report_here
                                 else (lambda s: None),
                                 context_parallel=a.context_parallel, attention_backend=a.attention_backend)
    report["command"] = "attnplug bench-model " + " ".join(argv if argv is not None else sys.argv[1:])
    ok = 0 if all(r["ms"] is not None for r in report["results"]) else 1
    if not report_here:
        return ok
    print(format_table(report))
    if a.json:
        from pathlib import Path

        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str))
    return ok


if __name__ == "__main__":  # python -m attnplug.bench.model
    raise SystemExit(main())
