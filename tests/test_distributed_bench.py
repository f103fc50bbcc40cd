"""The multi-GPU layer benchmark (`bench/parallel.py`) at a tiny size on 1 and 2 gloo CPU processes."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from distributed_helpers import run_ranks  # noqa: E402


def _worker(rank: int, world: int) -> dict:
    import os

    from attnplug.bench.parallel import measure

    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    return measure(size=128, text=8, heads=2, head_dim=16, dtype="fp32", device="cpu", warmup=1, iters=2)


def test_bench_runs_unsharded_on_one_rank_and_sharded_on_two(tmp_path: Path) -> None:
    one = run_ranks(_worker, 1, tmp_path)[0]
    assert one["path"] == "unsharded (PyTorch path)" and one["comm_ms"] == 0.0 and one["tokens"] == 8 + 64
    two = run_ranks(_worker, 2, tmp_path)
    assert [r["tokens_per_rank"] for r in two] == [4 + 32, 4 + 32]
    assert all(r["path"] == "sharded (PyTorch path)" for r in two)
    assert all(r["comm_ms"] > 0 and r["layer_ms"] > 0 for r in two)
