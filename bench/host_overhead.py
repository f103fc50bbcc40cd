"""Host time per served ttr call: what `Session.attention` costs beyond its kernels (GPU only).

`python -m attnplug.bench.host_overhead --sizes 1024,2048 --json host.json` serves the product default layer
(random φ with a stand-in running mean of d, marked ready; `[plugins.ttr] kernel = "triton"`) through
`Session.attention` at Flux shapes (bf16, 24 heads × 128, 512 text tokens, a sampler step's call) and reports per
call, for the session's default non-finite check and for each `--checks` value:

- `wall_ms`   — back-to-back calls between two CUDA events, divided by their number;
- `device_us` — the kernels' device time (torch's profiler, summed per call);
- `host_us`   — wall time of the Python calls with the GPU behind them (enqueued without a sync);
- `overhead_us` = wall − device: what the host adds to a call (0 when the kernels are the bottleneck);
- `syncs`     — device syncs in one call (torch's sync debug mode);

beside cuDNN SDPA's wall time on the same q, k, v. It imports only `attnplug.core` (`Session`, `AttentionCall`)
and `torch`, so the same file times any checkout of attnplug: run it once with an older tree on `PYTHONPATH`
(`--label before`) and once with this one (`--label after`) for the before/after rows of docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM, TXT = 24, 128, 512


def _events_ms(fn: Callable[[], object], calls: int) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def _host_us(fn: Callable[[], object], calls: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def _device_us(fn: Callable[[], object], calls: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(ev.device_time for ev in prof.events()
               if ev.device_type == torch.autograd.DeviceType.CUDA) / calls


def _syncs(fn: Callable[[], object]) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def measure(fn: Callable[[], object], calls: int, reps: int) -> dict[str, float]:
    """wall, device and host time per call of `fn` (medians of `reps` rounds of `calls` calls), syncs per call."""
    for _ in range(3):
        fn()
    wall = statistics.median(_events_ms(fn, calls) for _ in range(reps))
    host = statistics.median(_host_us(fn, calls) for _ in range(reps))
    device = _device_us(fn, calls)
    return {"wall_ms": wall, "device_us": device, "host_us": host, "overhead_us": max(0.0, wall * 1e3 - device),
            "syncs": _syncs(fn)}


def served_call(side: int, check: str | None) -> tuple[Callable[[], object], Callable[[], object]]:
    """(the served ttr call, cuDNN SDPA) on the same bf16 q, k, v at a Flux size of `side` pixels."""
    from attnplug.core import AttentionCall, Session

    n_img = (side // 16) ** 2
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, TXT + n_img, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
               for _ in range(3))
    config: dict[str, Any] = {"backend": "ttr", "exact": "sdpa", "loggers": [], "strict": True,
                              "plugins": {"ttr": {"kernel": "triton"}}}
    if check is not None:
        config["finite_check"] = check
    session = Session(config)
    ttr = session.backends.get("ttr")
    ttr.ready["single:0"] = True
    call = AttentionCall(layer_key="single:0", block_type="single", block_index=0, sigma=0.5, cfg_scale=3.5,
                         step_index=0, num_steps=20, n_cond_tokens=TXT, n_image_tokens=n_img,
                         latent_grid=(side // 16, side // 16), host="bench")
    session.run_start(num_steps=20, host="bench")
    with torch.inference_mode():
        session.attention(q, k, v, call)  # builds the layer
    layer = ttr.layers["single:0"]
    if hasattr(layer, "set_d_reference"):  # a distilled layer's running mean of d (adaptive α in one pass)
        layer.set_d_reference(torch.full((HEADS,), 0.1, device="cuda"))

    def serve() -> object:
        with torch.inference_mode():
            return session.attention(q, k, v, call)

    def sdpa() -> object:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    return serve, sdpa


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnplug-bench-host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,2048", help="comma list of Flux image sides in pixels")
    p.add_argument("--checks", default="default,per_step",
                   help="comma list of finite_check values to time ('default': the session's own)")
    p.add_argument("--calls", type=int, default=50, help="calls per round (enqueued without a sync)")
    p.add_argument("--reps", type=int, default=5, help="rounds; medians are reported")
    p.add_argument("--label", default="this tree", help="names the checkout in the output (e.g. before, after)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attnplug bench host_overhead: needs CUDA", file=sys.stderr)
        return 2
    import attnplug

    rows = []
    for size in (int(x) for x in a.sizes.split(",") if x.strip()):
        for check in (c.strip() for c in a.checks.split(",") if c.strip()):
            serve, sdpa = served_call(size, None if check == "default" else check)
            row = {"label": a.label, "size": f"{size}²", "finite_check": check, **measure(serve, a.calls, a.reps)}
            row["sdpa_ms"] = measure(sdpa, a.calls, a.reps)["wall_ms"]
            row["x_sdpa"] = row["sdpa_ms"] / row["wall_ms"]
            rows.append(row)
            print(f"[host] {a.label:>10} {row['size']:>6} {check:<10} wall {row['wall_ms']:.3f} ms "
                  f"(cuDNN {row['sdpa_ms']:.3f} ms, x{row['x_sdpa']:.2f})  device {row['device_us']:.0f} us  "
                  f"host {row['host_us']:.0f} us  overhead {row['overhead_us']:.0f} us  syncs {row['syncs']}",
                  flush=True)
            torch.cuda.empty_cache()
    report = {"label": a.label, "attnplug": str(Path(attnplug.__file__).parent), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(), "rows": rows}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":  # python -m attnplug.bench.host_overhead
    raise SystemExit(main())
