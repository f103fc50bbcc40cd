"""Data-parallel distillation on 2 gloo CPU processes: each rank trains on its own samples, gradients are averaged,
readiness and the running reference stay identical on every rank, and rank 0's checkpoint equals the one a single
process writes when it trains on both ranks' samples concatenated along the batch."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from distributed_helpers import run_ranks  # noqa: E402

from attnplug.core import AttentionCall, Session, load_checkpoint  # noqa: E402

H, D, N_COND, GRID = 2, 8, 3, (4, 5)
STEPS = 4
CONFIG = {"backend": "ttr", "exact": "sdpa", "training": True, "distiller": "ttr", "loggers": [], "seed": 7,
          "plugins": {"ttr": {"feature_dim": 16, "depth": 1, "hidden": 0, "key_chunk": 8, "query_chunk": 8},
                      "landmark": {"fraction": 0.1, "min": 4, "window": 1},
                      "distill": {"query_cap": 12, "train_steps_per_call": 2, "readiness_min_updates": 1,
                                  "readiness_threshold": 1.0, "log_every": 0, "layer_log_every": 0,
                                  "replay_max_mb": 64, "replay_dtype": "float32"}}}


def _sample(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    n = N_COND + GRID[0] * GRID[1]
    return tuple(torch.randn(1, H, n, D, generator=g) for _ in range(3))  # type: ignore[return-value]


def _train(path: Path, ranks: list[int], parallel: bool) -> Session:
    """Train one layer for STEPS steps on the samples of `ranks` (concatenated along the batch) and save."""
    torch.manual_seed(0)
    session = Session(CONFIG)
    dp = None
    if parallel:
        from attnplug.plugins.ttr.distill_parallel import DataParallel

        dp = DataParallel(session)
    for step in range(STEPS):
        q, k, v = (torch.cat(t, dim=0) for t in zip(*(_sample(step, r) for r in ranks)))
        call = AttentionCall("single:0", "single", 0, sigma=1.0 - step / STEPS, step_index=step, num_steps=STEPS,
                             n_cond_tokens=N_COND, n_image_tokens=GRID[0] * GRID[1], latent_grid=GRID, host="test")
        session.attention(q, k, v, call)
    session.run_end()
    if dp is not None:
        dp.save(path)
    else:
        session.save(path)
    return session


def _worker(rank: int, world: int, path: str) -> dict:
    session = _train(Path(path), [rank], parallel=True)
    distiller = session.distiller
    layer = session.backends.get("ttr").layers["single:0"]
    return {"readiness": distiller.readiness["single:0"].to_json(),
            "weights": {n: p.detach().clone() for n, p in layer.state_dict().items()},
            "trained": session.stats["single:0"].trained}


def test_data_parallel_distillation_equals_one_process_on_the_combined_batch(tmp_path: Path) -> None:
    shared = tmp_path / "dp.safetensors"
    results = run_ranks(_worker, 2, tmp_path, str(shared))
    # identical state on every rank: readiness (EMA, counts, flag) bit for bit, weights and the running reference
    assert results[0]["readiness"] == results[1]["readiness"]
    assert results[0]["trained"] == results[1]["trained"] == STEPS
    for name, t in results[0]["weights"].items():
        assert torch.equal(t, results[1]["weights"][name]), name
    single_path = tmp_path / "single.safetensors"
    single = _train(single_path, [0, 1], parallel=False)
    assert single.distiller.readiness["single:0"].ready == results[0]["readiness"]["ready"]
    dp, one = load_checkpoint(shared), load_checkpoint(single_path)
    assert set(dp) == set(one)
    for comp in one:
        tensors_dp, meta_dp = dp[comp]
        tensors_one, meta_one = one[comp]
        assert set(tensors_dp) == set(tensors_one), comp
        for name in tensors_one:
            torch.testing.assert_close(tensors_dp[name], tensors_one[name], rtol=1e-4, atol=1e-6,
                                       msg=f"{comp}/{name}")
    assert not list(tmp_path.glob(".*.tmp"))  # rank 0 alone wrote it, atomically
