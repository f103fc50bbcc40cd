"""`attnplug bench` — see the package docstring. `main(argv)` is the command line; `run_bench` the API."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .variants import TTR_CONFIGS, Shape, build_variants, renamed_hint, unknown_configs

#: Flux shapes: 512 text tokens + (side/16)² image tokens.
NAMED_SIZES = {"256": 256, "512": 512, "1024": 1024, "2048": 2048, "4096": 4096}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_shape(text: str, heads: int, head_dim: int, txt: int, batch: int) -> Shape:
    """`1024` (a Flux image side in pixels) or `N` tokens as `n=5000` or `n=5000:txt=256`."""
    if text.startswith("n="):
        parts = dict(p.split("=", 1) for p in text.split(":"))
        n = int(parts["n"])
        t = int(parts.get("txt", txt))
        if not 0 <= t <= n:
            raise ValueError(f"shape {text!r}: txt must be in [0, n]")
        return Shape(text, batch, heads, n, head_dim, t)
    side = int(text)
    if side % 16:
        raise ValueError(f"shape {text!r}: an image side must be a multiple of 16 (Flux packs 2x2 latents of /8)")
    return Shape(f"{side}²", batch, heads, txt + (side // 16) ** 2, head_dim, txt)


# ---- timing -------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], device: torch.device, reps: int) -> list[float]:
    """Milliseconds of each of `reps` calls: CUDA events around each call (host clock on CPU),
    synchronised before the first and after the last."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, min_reps: int, budget_ms: float) -> list[float]:
    """Per-call times (ms) after `warmup` calls: CUDA events around each call, host clock on CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize(device)
        est = max(s.elapsed_time(e), 1e-3)
        return time_calls(fn, device, int(max(min_reps, min(200, budget_ms / est))))
    times = []
    t_end = time.perf_counter() + budget_ms / 1000
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak device memory one call allocates beyond what was allocated before it (output included)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """The card's bf16 matrix rate (8192³ product, random data) and copy bandwidth (1 GiB, read+write)."""
    if device.type != "cuda":
        return {"tflops": 1.0, "gbps": 50.0, "measured": False}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = statistics.median(time_ms(lambda: a @ b, device, 3, 10, 100))
    x = torch.empty(2 ** 29, device=device, dtype=torch.float16).normal_()
    y = torch.empty_like(x)
    cp = statistics.median(time_ms(lambda: y.copy_(x), device, 3, 10, 100))
    return {"tflops": 2 * 8192 ** 3 / (mm * 1e-3) / 1e12, "gbps": 2 * 2 ** 30 / (cp * 1e-3) / 1e9, "measured": True}


# ---- the run ------------------------------------------------------------------------------------------
@dataclass
class Result:
    variant: str
    family: str
    shape: str
    dtype: str
    n_tokens: int
    ms: float | None = None
    ms_spread: tuple[float, float] | None = None  # 20th and 80th percentile
    peak_extra_mib: float | None = None
    gflop: float | None = None
    gbyte: float | None = None
    floor_ms: float | None = None
    speedup_vs_fastest_sdpa: float | None = None
    speedup_baseline: str | None = None  # the SDPA row that ratio is against (graph rows: the graph SDPA)
    rel_err: float | None = None
    rel_err_vs: str | None = None
    skipped: str | None = None
    cuda_graph: bool = False
    notes: dict[str, Any] = field(default_factory=dict)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_bench(shapes: list[Shape], dtypes: list[torch.dtype], device: torch.device, only: list[str] | None = None,
              warmup: int = 3, min_reps: int = 10, budget_ms: float = 300.0, check: bool = True,
              ceilings: dict[str, float] | None = None, log: Callable[[str], None] = print,
              configs: list[str] | None = None, graphs: bool = True) -> dict[str, Any]:
    """Time every variant at every shape and dtype; returns the JSON-able report.

    A variant with `check_against` is compared (relative L2 error) with that variant's output as soon
    as it has run; an output is kept only while a later variant still needs it. Speed-ups are against
    the fastest SDPA row of the same kind: non-graph rows against non-graph SDPA, CUDA-graph rows
    against the graph-captured SDPA.
    """
    ceil = ceilings or measure_ceilings(device)
    results: list[Result] = []
    for shape in shapes:
        for dtype in dtypes:
            g = torch.Generator(device="cpu").manual_seed(1234)
            q, k, v = (torch.randn(shape.b, shape.h, shape.n, shape.d, generator=g).to(device=device, dtype=dtype)
                       for _ in range(3))
            variants = build_variants(shape, dtype, device, only, configs, graphs)
            # how many variants still want each output as their reference
            refs_left = Counter(x.check_against for x in variants if x.check_against and check)
            rows: list[Result] = []
            outputs: dict[str, torch.Tensor] = {}
            for var in variants:
                r = Result(var.name, var.family, shape.label, str(dtype).replace("torch.", ""), shape.n,
                           cuda_graph=var.graph_of is not None, notes=dict(var.notes))
                rows.append(r)
                flops, nbytes = var.cost
                r.gflop, r.gbyte = flops / 1e9, nbytes / 1e9
                r.floor_ms = max(flops / (ceil["tflops"] * 1e12), nbytes / (ceil["gbps"] * 1e9)) * 1e3
                if var.skip:
                    r.skipped = var.skip
                else:
                    _run_one(var, r, q, k, v, device, warmup, min_reps, budget_ms, outputs, refs_left)
                if var.check_against and check:
                    refs_left[var.check_against] -= 1
                    if refs_left[var.check_against] <= 0:
                        outputs.pop(var.check_against, None)
                if r.ms is not None:
                    log(f"  {shape.label:>7} {r.dtype:<8} {r.variant:<46} {r.ms:9.3f} ms")
            outputs.clear()
            _speedups(rows)
            results.extend(rows)
            del q, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"env": environment(device), "ceilings": ceil, "results": [asdict(r) for r in results]}


def _run_one(var: Any, r: Result, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, device: torch.device,
             warmup: int, min_reps: int, budget_ms: float, outputs: dict[str, torch.Tensor],
             refs_left: Counter) -> None:
    """Build, check and time one variant into `r`; a failure becomes `r.skipped` (one failing variant must
    not stop the table)."""
    try:
        fn = var.make(q, k, v)  # a CUDA graph and its memory pool live as long as this callable
        out = fn()
        describe = getattr(fn, "describe", None)  # a variant that can say what served it (the session rows)
        if describe is not None:
            r.notes.update(describe())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not torch.isfinite(out).all():
            r.skipped = "non-finite output"
            return
        ref = outputs.get(var.check_against) if var.check_against else None
        if ref is not None:
            r.rel_err, r.rel_err_vs = _rel_err(out, ref), var.check_against
        if refs_left.get(var.name, 0) > 0:
            outputs[var.name] = out
        del out
        ts = time_ms(fn, device, warmup, min_reps, budget_ms)
        r.ms = statistics.median(ts)
        qs = statistics.quantiles(ts, n=5) if len(ts) >= 5 else [min(ts), max(ts)]
        r.ms_spread = (qs[0], qs[-1])
        peak = getattr(fn, "peak_extra_bytes", None)  # a graph replay allocates nothing: its capture's peak
        if peak is None:
            peak = peak_extra_bytes(fn, device)
        r.peak_extra_mib = None if peak is None else peak / 2 ** 20
    except torch.OutOfMemoryError as exc:  # type: ignore[attr-defined]
        r.skipped = f"out of memory: {str(exc).splitlines()[0]}"
        torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001
        r.skipped = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _speedups(rows: list[Result]) -> None:
    """`speedup_vs_fastest_sdpa` of every timed row: non-graph rows against the fastest non-graph SDPA row,
    graph rows against the fastest graph SDPA row; `notes["launch_overhead_ms"]` of a graph row is its
    non-graph variant's time minus its own."""
    for graph in (False, True):
        sdpa = [r for r in rows if r.family == "sdpa" and r.cuda_graph == graph and r.ms is not None]
        if not sdpa:
            continue
        best = min(sdpa, key=lambda r: r.ms)  # type: ignore[arg-type, return-value]
        for r in rows:
            if r.ms is not None and r.cuda_graph == graph:
                r.speedup_vs_fastest_sdpa = best.ms / r.ms  # type: ignore[operator]
                r.speedup_baseline = best.variant
    by_name = {r.variant: r for r in rows}
    for r in rows:
        base = by_name.get(r.notes.get("graph_of", ""))
        if r.ms is not None and base is not None and base.ms is not None:
            r.notes["launch_overhead_ms"] = base.ms - r.ms


def environment(device: torch.device, packages: tuple[str, ...] = ("triton",)) -> dict[str, Any]:
    """What a timing ran on: torch, python, the versions of `packages`, and the GPU (or CPU)."""
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    for name in packages:
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            env[name] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2 ** 30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table: time, spread, speed-up vs the fastest SDPA, floor, peak memory, error."""
    lines = [(f"{'shape':>7} {'dtype':<8} {'variant':<46} {'ms':>9} {'x SDPA':>7} {'floor ms':>9} "
              f"{'%floor':>6} {'peak MiB':>9} {'rel err':>8}")]
    for r in report["results"]:
        if r["skipped"]:
            lines.append(f"{r['shape']:>7} {r['dtype']:<8} {r['variant']:<46} skipped: {r['skipped'][:110]}")
            continue
        pct = 100 * r["floor_ms"] / r["ms"] if r["ms"] else float("nan")
        peak = f"{r['peak_extra_mib']:9.0f}" if r["peak_extra_mib"] is not None else f"{'-':>9}"
        err = f"{r['rel_err']:8.1e}" if r["rel_err"] is not None else f"{'-':>8}"
        lines.append(f"{r['shape']:>7} {r['dtype']:<8} {r['variant']:<46} {r['ms']:9.3f} "
                     f"{r['speedup_vs_fastest_sdpa'] or float('nan'):7.2f} {r['floor_ms']:9.3f} {pct:6.1f} {peak} {err}")
    if any(r.get("cuda_graph") and r["ms"] is not None for r in report["results"]):
        lines.append("'... graph' rows: one call captured in a CUDA graph and replayed; their x SDPA is against "
                     "'sdpa[cudnn] graph', their peak is what the capture allocated (the graph's pool keeps it)")
    lines += headline(report)
    c = report["ceilings"]
    lines.append(f"ceilings: {c['tflops']:.0f} TFLOP/s, {c['gbps']:.0f} GB/s "
                 f"({'measured' if c.get('measured') else 'nominal'}); env: {report['env']}")
    return "\n".join(lines)


def headline(report: dict[str, Any]) -> list[str]:
    """The product path per shape: each `session ttr-<config>` row (what a user's call runs) beside its bare kernels
    (`ttr-<config> fused`, a plan built once) and their ratio to the fastest SDPA; empty without session rows."""
    rows = [r for r in report["results"] if r["variant"].startswith("session ") and not r["cuda_graph"]]
    if not rows:
        return []
    by = {(r["shape"], r["dtype"], r["variant"]): r for r in report["results"]}
    out = ["product path (Session.attention, a ready layer, the configuration's defaults) vs bare kernels:"]
    for r in rows:
        if r["ms"] is None:
            out.append(f"  {r['shape']:>7} {r['dtype']:<8} {r['variant']:<40} skipped: {r['skipped'][:80]}")
            continue
        bare = by.get((r["shape"], r["dtype"], r["variant"].removeprefix("session ").split(" ")[0] + " fused"))
        text = f"  {r['shape']:>7} {r['dtype']:<8} {r['variant']:<40} {r['ms']:8.3f} ms = " \
               f"{r['speedup_vs_fastest_sdpa'] or float('nan'):5.2f}x {r['speedup_baseline'] or 'SDPA'}"
        if bare is not None and bare["ms"] is not None:
            text += f"; bare kernels {bare['ms']:.3f} ms = {bare['speedup_vs_fastest_sdpa'] or float('nan'):.2f}x"
        if r["notes"].get("served_by"):
            text += f" [{r['notes']['served_by']} path]"
        out.append(text)
    return out


def kernel_config(text: str | None) -> Any:
    """`--kernel-config` JSON as a `KernelConfig` (None without it; a ValueError naming the field)."""
    from ..plugins.ttr.kernels.tiles import config_from_json

    return config_from_json(text) if text else None


def main(argv: list[str] | None = None) -> int:
    """Command line of `attnplug bench`; returns the exit status."""
    p = argparse.ArgumentParser(prog="attnplug bench", description=__doc__)
    p.add_argument("--sizes", default=None,
                   help="comma list of Flux image sides (1024,2048,4096) or token counts (n=5000[:txt=256]); "
                        "default 1024,2048,4096 on CUDA, 256,n=600 on CPU")
    p.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16, fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--txt", type=int, default=512, help="conditioning (text) tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--only", default=None, help="comma list of substrings; keep variants whose name has one "
                                                "(SDPA rows always stay)")
    p.add_argument("--configs", default=None,
                   help="comma list of ttr configurations to time (default all): " + ", ".join(TTR_CONFIGS))
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replays ('... graph' rows)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-reps", type=int, default=10)
    p.add_argument("--budget-ms", type=float, default=300.0, help="time spent timing each variant")
    p.add_argument("--no-check", action="store_true", help="skip fused-vs-PyTorch error checks")
    p.add_argument("--smoke", action="store_true", help="tiny CPU-speed shapes (CI)")
    p.add_argument("--kernel-config", default=None, metavar="JSON",
                   help="fused kernels' tiles changed for this run, e.g. '{\"lm_direct\": 2}' (KernelConfig fields)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    a = p.parse_args(argv)
    from ..cli import UsageProblem, check_device, check_output

    try:  # before the run: a bench that cannot write its report, or has no GPU, fails now, not after it
        check_output("--json", a.json)
        if a.device:
            check_device(a.device)
    except UsageProblem as exc:
        print(f"attnplug bench: {exc}", file=sys.stderr)
        return 2
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    heads, hd, txt = a.heads, a.head_dim, a.txt
    if a.smoke:
        heads, hd, txt = 2, 32, 16
    sizes = a.sizes or ("1024,2048,4096" if device.type == "cuda" and not a.smoke else "n=80:txt=16,n=160:txt=16")
    try:
        shapes = [parse_shape(s.strip(), heads, hd, txt, a.batch) for s in sizes.split(",") if s.strip()]
        dtypes = [DTYPES[d.strip()] for d in a.dtypes.split(",") if d.strip()]
        tiles = kernel_config(a.kernel_config)
    except (KeyError, ValueError) as exc:
        print(f"attnplug bench: {exc}", file=sys.stderr)
        return 2
    only = [s for s in a.only.split(",")] if a.only else None
    configs = [c.strip() for c in a.configs.split(",") if c.strip()] if a.configs else None
    if configs is not None and (not configs or unknown_configs(configs)):
        print(f"attnplug bench: --configs: unknown {unknown_configs(configs) or configs}"
              f"{renamed_hint(unknown_configs(configs))}; expected a comma list of {', '.join(TTR_CONFIGS)}",
              file=sys.stderr)
        return 2
    if a.smoke:
        a.warmup, a.min_reps, a.budget_ms = 1, 2, 5.0
    from ..plugins.ttr.kernels.tiles import using_config

    with using_config(tiles):
        report = run_bench(shapes, dtypes, device, only, a.warmup, a.min_reps, a.budget_ms, not a.no_check,
                           log=lambda s: print(s, file=sys.stderr, flush=True), configs=configs,
                           graphs=not a.no_graphs)
    report["command"] = "attnplug bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(report))
    if a.json:
        try:
            a.json.write_text(json.dumps(report, indent=1, default=str))
        except OSError as exc:  # the table above is printed: the numbers are not lost
            print(f"attnplug bench: --json {a.json}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":  # python -m attnplug.bench.run
    raise SystemExit(main())
