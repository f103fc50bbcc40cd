"""Non-finite outputs on a sequence-parallel call, 2 gloo CPU processes: rows that are not finite on one rank only
make every rank take the same decision — the layer's device flag all-reduced and the poll after sharded calls
waiting for it (finite_check = "per_step"), the check itself all-reduced ("every_call") — so the ranks keep routing
the same way and their collectives keep pairing up."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from distributed_helpers import run_ranks  # noqa: E402

from attnplug.core import AttentionCall, LayerSpec, Session  # noqa: E402
from attnplug.core.shard import SequenceShard  # noqa: E402

H, D, N_COND, GRID = 2, 8, 4, (4, 4)


def _worker(rank: int, world: int) -> dict:
    out = {}
    for check in ("per_step", "every_call"):
        session = Session({"backend": "ttr", "exact": "host", "loggers": [], "finite_check": check,
                           "plugins": {"ttr": {"feature_dim": 16, "depth": 1, "hidden": 0, "alpha_reference": "running"},
                                       "landmark": {"fraction": 0.1, "min": 4, "window": 1}}})
        ttr = session.backends.get("ttr")
        torch.manual_seed(0)
        # α against a running reference: the bad row stays on its rank (the call's mean of d would spread it)
        ttr.layer(LayerSpec("single:0", H, D)).set_d_reference(torch.tensor([0.3, 0.5]))
        ttr.ready["single:0"] = True
        shard = SequenceShard.split(N_COND, GRID[0] * GRID[1], rank, world)
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(1, H, shard.n_local, D, generator=g) for _ in range(3))
        if rank == 0:
            q[:, :, 3] = float("nan")  # one bad query row on rank 0 only
        call = AttentionCall("single:0", "single", 0, sigma=0.5, step_index=0, n_cond_tokens=shard.cond_sizes[rank],
                             n_image_tokens=shard.image_sizes[rank], latent_grid=GRID, shard=shard, host="test")
        session.attention(q, k, v, call, None, lambda q_, k_, v_, m_: torch.zeros_like(q_))
        session.attention(q, k, v, call.with_(step_index=1, sigma=0.4), None,
                          lambda q_, k_, v_, m_: torch.zeros_like(q_))  # a new step polls the flags
        out[check] = {"nonfinite": sorted(session._nonfinite_layers),
                      "fallbacks": dict(session.stats["single:0"].fallbacks)}
    return out


def test_a_non_finite_row_on_one_rank_moves_every_rank_alike(tmp_path: Path) -> None:
    first, second = run_ranks(_worker, 2, tmp_path)
    assert first == second
    assert first["per_step"]["nonfinite"] == ["single:0"]
    assert first["every_call"]["fallbacks"] and all("non-finite" in r for r in first["every_call"]["fallbacks"])
