"""Sequence-parallel ttr on 2 and 4 gloo CPU processes: each rank's rows equal the single-process layer's.

Covers the text split like diffusers' context parallelism and replicated on every rank, the local window (its halo
within one neighbour and across several shards), landmarks only, uneven splits, the call's own mean of d (an
all-reduce) and the running reference (none), the landmark backend served alone, and the session's route.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from distributed_helpers import run_ranks  # noqa: E402

from attnplug.core import AttentionCall, LayerSpec  # noqa: E402
from attnplug.core.shard import SequenceShard  # noqa: E402
from attnplug.plugins.landmark.backend import LandmarkBackend  # noqa: E402
from attnplug.plugins.landmark.settings import LandmarkSettings  # noqa: E402
from attnplug.plugins.ttr.backend import TtrBackend  # noqa: E402
from attnplug.plugins.ttr.settings import TtrSettings  # noqa: E402

B, H, D = 2, 2, 8

#: name -> (n_cond, grid, window, cond_replicated, alpha_reference, running reference kept)
CASES: dict[str, tuple[int, tuple[int, int], int, bool, str, bool]] = {
    "window": (6, (6, 8), 2, False, "running", False),
    "window-running": (6, (6, 8), 2, False, "running", True),
    "landmarks-only": (5, (5, 7), 0, False, "call", False),
    "replicated-text": (6, (6, 8), 1, True, "call", False),
    "uneven": (7, (5, 9), 2, False, "call", False),
    "no-text": (0, (6, 6), 1, False, "call", False),
}


def build(name: str) -> tuple[TtrBackend, torch.Tensor, torch.Tensor, torch.Tensor, AttentionCall]:
    """The backend (seeded weights) and the whole sequence's q, k, v and call of one case."""
    n_cond, grid, window, _, reference, running = CASES[name]
    torch.manual_seed(1)
    landmark = LandmarkBackend(LandmarkSettings(fraction=0.1, min=4, window=window, query_chunk=7))
    backend = TtrBackend(TtrSettings(alpha_reference=reference, key_chunk=5, query_chunk=6), landmark=landmark)
    layer = backend.layer(LayerSpec("single:0", H, D))
    with torch.no_grad():  # a conditioner that does something
        layer.conditioner.fc2.weight.normal_(0, 0.1)
    if running:
        layer.set_d_reference(torch.tensor([0.3, 0.5]))
    n = n_cond + grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    call = AttentionCall("single:0", "single", 0, sigma=0.7, step_index=0, cfg_scale=3.5, n_cond_tokens=n_cond,
                         n_image_tokens=grid[0] * grid[1], latent_grid=grid, host="test")
    return backend, q, k, v, call


def local_call(name: str, rank: int, world: int) -> tuple[SequenceShard, torch.Tensor]:
    n_cond, grid, _, replicated, _, _ = CASES[name]
    shard = SequenceShard.split(n_cond, grid[0] * grid[1], rank, world, cond_replicated=replicated)
    return shard, shard.global_index(rank)


def _worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    out = {}
    for name in CASES:
        backend, q, k, v, call = build(name)
        shard, rows = local_call(name, rank, world)
        local = call.with_(n_cond_tokens=shard.cond_sizes[rank], n_image_tokens=shard.image_sizes[rank], shard=shard)
        assert backend.not_supported_reasons(q[:, :, rows], k[:, :, rows], v[:, :, rows], local) == []
        out[name] = backend.forward(q[:, :, rows], k[:, :, rows], v[:, :, rows], local)
        if name == "window":  # the landmark backend served alone
            out["landmark-alone"] = backend.residual().forward(q[:, :, rows], k[:, :, rows], v[:, :, rows], local)
    return out


def _check(results: list[dict[str, torch.Tensor]], world: int) -> None:
    for name in CASES:
        backend, q, k, v, call = build(name)
        expected = backend.forward(q, k, v, call)
        for rank, got in enumerate(results):
            _, rows = local_call(name, rank, world)
            torch.testing.assert_close(got[name], expected[:, :, rows], rtol=1e-5, atol=1e-5, msg=name)
            if name == "window":
                alone = backend.residual().forward(q, k, v, call)
                torch.testing.assert_close(got["landmark-alone"], alone[:, :, rows], rtol=1e-5, atol=1e-5)


def test_two_ranks_equal_the_single_process_layer(tmp_path: Path) -> None:
    _check(run_ranks(_worker, 2, tmp_path), 2)


def test_four_ranks_equal_the_single_process_layer_with_halos_across_shards(tmp_path: Path) -> None:
    # 48 image tokens on 4 ranks: 12 each, 1.5 grid rows; the radius-2 halo (2·8 + 2 = 18 rows) spans two shards
    _check(run_ranks(_worker, 4, tmp_path), 4)


def test_sharded_calls_without_sequence_parallel_support_go_to_the_host(core_plugins) -> None:
    from attnplug.core import Session

    session = Session({"backend": "sdpa", "exact": "sdpa"}, plugins=core_plugins)
    shard = SequenceShard.split(2, 6, 0, 2)
    call = AttentionCall("single:0", "single", 0, sigma=1.0, step_index=0, n_cond_tokens=1, n_image_tokens=3,
                         latent_grid=(2, 3), shard=shard, host="test")
    q = torch.randn(1, 2, 4, 8)
    seen = []

    def host(q_, k_, v_, m_):
        seen.append(q_.shape)
        return torch.zeros_like(q_)

    out = session.attention(q, q, q, call, None, host)
    assert seen and torch.equal(out, torch.zeros_like(q))  # 'sdpa' would see only this rank's keys
    assert session.stats["single:0"].served["host"] == 1
    with pytest.raises(ValueError, match="host's attention"):
        session.attention(q, q, q, call, None, None)
