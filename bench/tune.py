"""Tile-size sweep of the fused ttr kernels on the current GPU (how `KernelConfig`'s defaults were chosen).

`python -m attnplug.bench.tune [--sizes 1024,2048]` prints the median time of each config for the
default layer (2-layer φ, F = 128, 8 % landmarks) and the lean one — tiles, warps and the 2-layer φ's
hidden chunk; the best per size is listed last.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch

from ..plugins.landmark.selection import select_landmarks
from ..plugins.ttr.kernels import KernelConfig, random_phi, ttr_forward_fused
from .run import parse_shape, time_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnplug-bench-tune")
    p.add_argument("--sizes", default="1024,2048")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    dev = torch.device("cuda")
    layers = {"default": (2, 256, 128, 0.08), "lean": (1, 128, 128, 0.02)}
    # hidden_chunk (2-layer φ): 0 = the whole hidden tile in registers (the default), 64 = four steps
    grid = dict(q_block_m=[64, 128], q_warps=[4, 8], lm_block=[64, 128], kv_block_n=[64, 128], kv_warps=[4, 8],
                hidden_chunk=[0, 64])
    if a.quick:
        grid = dict(q_block_m=[64, 128], q_warps=[4, 8], lm_block=[64], kv_block_n=[64], kv_warps=[8],
                    hidden_chunk=[0, 64])
    best: list[str] = []
    for size in a.sizes.split(","):
        s = parse_shape(size, 24, 128, 512, 1)
        q, k, v = (torch.randn(1, 24, s.n, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        for lname, (depth, hidden, feat, frac) in layers.items():
            g = torch.Generator().manual_seed(0)
            pq = random_phi(128, hidden, feat, depth, generator=g, device=dev)
            pk = random_phi(128, hidden, feat, depth, generator=g, device=dev)
            idx = select_landmarks(s.n, 512, frac, 64, 0)[0].to(dev)  # the landmark plugin's own positions
            rows = []
            for vals in itertools.product(*grid.values()):
                cfg = KernelConfig(**dict(zip(grid.keys(), vals)))
                try:
                    fn = lambda: ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, config=cfg, strict=True)  # noqa: E731
                    ms = statistics.median(time_ms(fn, dev, 2, 10, 100))
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"{size} {lname} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
                    continue
                rows.append((ms, cfg))
                print(f"{size} {lname} {ms:8.3f} ms {cfg}", flush=True)
            if rows:
                ms, cfg = min(rows, key=lambda r: r[0])
                best.append(f"BEST {size} {lname}: {ms:.3f} ms {cfg}")
    print("\n".join(best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
