"""One default ttr layer, sequence-parallel over the ranks of a torchrun job: time per call, and the time of its
communication alone.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
    torchrun --nproc-per-node 4 -m attnplug.bench.parallel --size 4096 --json parallel-4.json

(the program sets both variables itself too: NVLink multicast stays off). With one rank it times the unsharded
layer (the fused kernels on a GPU) — the 1-GPU baseline; with more, the sharded call on each rank's slice (text and
image tokens split as diffusers' context parallelism splits them): the fused kernels for the local work on a GPU
(`plugins/ttr/parallel_fused.py`), the PyTorch path on a CPU (`path` says which served). `comm_ms` times the same
collectives on buffers of the same sizes: the [S | z] all-reduce, the landmark all-gather, the window's whole halo
rows. Every rank but rank 0 prints nothing; rank 0 prints one JSON line (and writes `--json`).
`bench/multi_gpu.py` runs it on 1, 2 and 4 GPUs with the whole-model forwards.
"""
from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off, before any process group exists
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ..core.call import AttentionCall, LayerSpec  # noqa: E402
from ..core.shard import RowGather, SequenceShard, all_reduce_sum, grid_band  # noqa: E402
from ..plugins.landmark.backend import LandmarkBackend  # noqa: E402
from ..plugins.landmark.settings import LandmarkSettings  # noqa: E402
from ..plugins.ttr.backend import TtrBackend  # noqa: E402
from ..plugins.ttr.settings import TtrSettings  # noqa: E402
from .variants import give_stand_in_reference  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of `fn` over `iters` calls, every rank in step (a barrier before each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(size: int = 4096, text: int = 512, heads: int = 24, head_dim: int = 128, dtype: str = "bf16",
            device: str | None = None, warmup: int = 2, iters: int = 5) -> dict[str, Any]:
    """Time one layer call on this rank's slice (a process group must exist); every rank returns the same keys."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(device or (f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"))
    grid = (size // 16, size // 16)
    shard = SequenceShard.split(text, grid[0] * grid[1], rank, world)
    landmark = LandmarkBackend(LandmarkSettings())
    backend = TtrBackend(TtrSettings(), landmark=landmark)
    torch.manual_seed(0)  # the same layer on every rank
    layer = backend.layer(LayerSpec("single:0", heads, head_dim), dev)
    give_stand_in_reference(layer, backend.settings, dev)  # the kernels a distilled layer runs (α in one pass)
    g = torch.Generator(device=dev).manual_seed(1 + rank)
    n = shard.n_local if world > 1 else shard.n_tokens
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g, device=dev, dtype=_DTYPES[dtype]) for _ in range(3))
    whole = AttentionCall("single:0", "single", 0, sigma=0.5, step_index=0, n_cond_tokens=text,
                          n_image_tokens=grid[0] * grid[1], latent_grid=grid, host="bench")
    call = whole if world == 1 else whole.with_(n_cond_tokens=shard.cond_sizes[rank],
                                                n_image_tokens=shard.image_sizes[rank], shard=shard)
    layer_ms = _timed(lambda: backend.forward(q, k, v, call), dev, warmup, iters)
    comm_ms = 0.0
    if world > 1:
        f = TtrSettings().feature_dim
        state = torch.zeros(1, heads, f, head_dim + 1, device=dev, dtype=torch.float32)
        gather = RowGather(landmark.shared_indices(shard.n_tokens, whole, dev), shard, dev)
        kv = torch.cat([k, v], dim=-1)
        radius = landmark.settings.window

        def comm() -> None:
            all_reduce_sum(state, shard)
            gather(kv)
            if radius:
                grid_band(kv[:, :, shard.cond_sizes[rank]:], radius, grid, shard)

        comm_ms = _timed(comm, dev, warmup, iters)
    return {"size": size, "world": world, "tokens": shard.n_tokens, "tokens_per_rank": n, "dtype": dtype,
            "device": str(dev.type), "layer_ms": layer_ms, "comm_ms": comm_ms,
            "path": _path(backend, world)}


def _path(backend: TtrBackend, world: int) -> str:
    """Which path served the timed calls: unsharded or sharded, fused kernels or PyTorch."""
    from ..plugins.ttr.parallel_fused import ShardedPlan

    plans = [e.plan for layer in backend.layers.values() for e in layer.serve_cache.entries.values()]  # type: ignore[union-attr]
    fused = any(p is not None and (world == 1) != isinstance(p, ShardedPlan) for p in plans)
    return f"{'unsharded' if world == 1 else 'sharded'} ({'fused kernels' if fused else 'PyTorch path'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="image side in pixels (latent grid = size / 16)")
    parser.add_argument("--text", type=int, default=512, help="text tokens")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        result = measure(args.size, args.text, args.heads, args.head_dim, args.dtype, None, args.warmup, args.iters)
        if dist.get_rank() == 0:
            print(json.dumps(result))
            if args.json is not None:
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if started_here:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
