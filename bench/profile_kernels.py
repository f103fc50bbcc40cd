"""Where the fused ttr layer's time goes: device time per kernel, from torch's profiler (GPU only).

`python -m attnplug.bench.profile_kernels --sizes 1024,2048` runs the product's default layer
(`bench.default_layer`: φ, landmarks and window from the settings' defaults; adaptive α) on the fused path
and prints, per size and kernel configuration, the device time of each kernel per layer call — the key
pass, the query passes, the landmark SDPA chunks — beside cuDNN SDPA's; `--joint` adds the joint layer's call on the
same inputs (a double block's: text rows exact, learned far field image↔image). Used to pick what to optimize next
(docs/PERFORMANCE.md, "Where the time goes").
"""
from __future__ import annotations

import argparse
import collections
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ..plugins.ttr.kernels import KernelConfig
from ..plugins.ttr.settings import TtrSettings
from .default_layer import LayerInputs, default_layer


def kernel_times_us(fn, calls: int) -> dict[str, float]:
    """Device time (µs) per call of every kernel `fn` launches, by kernel name, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = collections.defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name[:70]] += ev.device_time / calls
    return dict(times)


def layer_runs(layer: LayerInputs, hidden_chunks: list[int | None], breakdown: bool = False,
               joint: bool = False) -> dict[str, Callable[[], object]]:
    """cuDNN SDPA and the default ttr layer per hidden chunk (None: `KernelConfig`'s own defaults, else that
    chunk for every φ pass — key, landmark and the other query passes): in-kernel landmarks, cuDNN landmarks, the TMA-fed
    landmark kernel, kernel-only (`breakdown`: also both landmark
    paths without the window, whose difference is the window's cost; `joint`: the joint layer with either landmark path)."""
    runs: dict[str, Callable[[], object]] = {
        "sdpa cudnn": lambda: F.scaled_dot_product_attention(layer.q, layer.k, layer.v)}
    for hc in hidden_chunks:
        cfg = KernelConfig() if hc is None else KernelConfig(kv_hidden_chunk=hc, q_hidden_chunk=hc,
                                                             lm_hidden_chunk=hc)
        tag = "default tiles" if hc is None else f"hc={hc}"
        runs[f"ttr fused-lm {tag}"] = layer.fused(cfg, "fused")
        runs[f"ttr sdpa-lm {tag}"] = layer.fused(cfg, "sdpa")
        runs[f"ttr tma-lm {tag}"] = layer.fused(cfg, "tma")
        runs[f"ttr kernel-only {tag}"] = layer.fused(cfg, None)
        if breakdown and layer.window:
            runs[f"ttr fused-lm no-window {tag}"] = layer.fused(cfg, "fused", window=False)
            runs[f"ttr sdpa-lm no-window {tag}"] = layer.fused(cfg, "sdpa", window=False)
        if joint:
            runs[f"ttr joint fused-lm {tag}"] = layer.joint(cfg, "fused")
            runs[f"ttr joint sdpa-lm {tag}"] = layer.joint(cfg, "sdpa")
            runs[f"ttr joint tma-lm {tag}"] = layer.joint(cfg, "tma")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnplug-bench-profile")
    p.add_argument("--sizes", default="1024,2048")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--hidden-chunks", default="default",
                   help="comma list: 'default' (KernelConfig's tiles) or one hidden chunk for every φ pass")
    p.add_argument("--breakdown", action="store_true", help="also time the landmark paths without the window")
    p.add_argument("--joint", action="store_true", help="also the joint layer's call (a double block's)")
    p.add_argument("--alpha-reference", default="default",
                   help="comma list of what adaptive α's d is normalised by: 'default' (the settings' default), "
                        "'call' (the call's mean: two query passes) or 'running' (a running mean: one pass)")
    a = p.parse_args(argv)
    dev = torch.device("cuda")
    refs = a.alpha_reference.split(",")
    bad = [r for r in refs if r not in ("default", "call", "running")]
    if bad:
        p.error(f"--alpha-reference: unknown {bad}; expected 'default', 'call' or 'running'")
    for size, ref in ((s, r) for s in a.sizes.split(",") for r in refs):
        layer = default_layer(size, dev, TtrSettings() if ref == "default" else TtrSettings(alpha_reference=ref))
        for name, fn in layer_runs(layer, [None if x == "default" else int(x) for x in a.hidden_chunks.split(",")],
                                          a.breakdown, a.joint).items():
            times = kernel_times_us(fn, a.calls)
            print(f"\n{layer.description} {name}: {sum(times.values()):.1f} µs device")
            for kname, us in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"  {us:9.1f} µs  {kname}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
