"""Where the fused ttr layer's time goes: device time per kernel, from torch's profiler (GPU only).

`python -m attnplug.bench.profile_kernels --sizes 1024,2048` runs the default layer (2-layer φ,
hidden 256, F = 128, 8 % landmarks, adaptive α) on the fused path and prints, per size and kernel
configuration, the device time of each kernel per layer call — the key pass, the query passes, the
landmark SDPA chunks, the mean of d — beside cuDNN SDPA's. Used to pick what to optimize next
(docs/PERFORMANCE.md, "Where the time goes").
"""
from __future__ import annotations

import argparse
import collections
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ..plugins.landmark.selection import select_landmarks
from ..plugins.ttr.kernels import KernelConfig, random_phi, ttr_forward_fused
from .run import parse_shape


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


def layer_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
               hidden_chunks: list[int]) -> dict[str, Callable[[], object]]:
    """cuDNN SDPA and the default ttr layer (fused / SDPA landmarks, kernel-only) per hidden chunk."""
    g = torch.Generator().manual_seed(0)
    pq = random_phi(128, 256, 128, 2, generator=g, device=q.device)
    pk = random_phi(128, 256, 128, 2, generator=g, device=q.device)

    def ttr(cfg: KernelConfig, impl: str | None) -> Callable[[], object]:
        lm = None if impl is None else idx
        return lambda: ttr_forward_fused(q, k, v, pq, pk, landmark_idx=lm, config=cfg, strict=True,
                                         landmark_impl=impl or "auto")

    runs: dict[str, Callable[[], object]] = {"sdpa cudnn": lambda: F.scaled_dot_product_attention(q, k, v)}
    for hc in hidden_chunks:
        cfg = KernelConfig(kv_hidden_chunk=hc, q_hidden_chunk=hc)
        runs[f"ttr fused-lm hc={hc}"] = ttr(cfg, "fused")
        runs[f"ttr sdpa-lm hc={hc}"] = ttr(cfg, "sdpa")
        runs[f"ttr kernel-only hc={hc}"] = ttr(cfg, None)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnplug-bench-profile")
    p.add_argument("--sizes", default="1024,2048")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--hidden-chunks", default="0,64", help="kv_hidden_chunk = q_hidden_chunk values to profile")
    a = p.parse_args(argv)
    dev = torch.device("cuda")
    for size in a.sizes.split(","):
        s = parse_shape(size, 24, 128, 512, 1)
        q, k, v = (torch.randn(1, 24, s.n, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        idx = select_landmarks(s.n, 512, 0.08, 64, 0)[0].to(dev)
        for name, fn in layer_runs(q, k, v, idx, [int(x) for x in a.hidden_chunks.split(",")]).items():
            times = kernel_times_us(fn, a.calls)
            print(f"\n{size} ({s.n} tokens, {idx.numel()} landmarks) {name}: {sum(times.values()):.1f} µs device")
            for kname, us in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"  {us:9.1f} µs  {kname}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
