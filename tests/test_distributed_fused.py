"""The fused kernels on a sequence-parallel call (`plugins/ttr/parallel_fused.py`) on 2 gloo CPU processes, in
Triton's interpreter: each rank's rows equal the single-process layer's, with the window (its halo), landmarks only,
replicated text, α against the call's mean of d (two passes, sums all-reduced between them) and against the running
reference (one pass); and the dispatch: 'auto' takes the fused plan where the kernels serve, the PyTorch path on a
CPU, 'triton' says why it cannot."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from distributed_helpers import run_ranks  # noqa: E402
from kernel_helpers import interpreted  # noqa: E402

from attnplug.core import AttentionCall, LayerSpec  # noqa: E402
from attnplug.core.shard import SequenceShard  # noqa: E402
from attnplug.plugins.landmark.backend import LandmarkBackend  # noqa: E402
from attnplug.plugins.landmark.settings import LandmarkSettings  # noqa: E402
from attnplug.plugins.ttr.backend import TtrBackend  # noqa: E402
from attnplug.plugins.ttr.parallel_fused import ShardedPlan  # noqa: E402
from attnplug.plugins.ttr.settings import TtrSettings  # noqa: E402


B, H, D = 1, 2, 16
SMALL = {"feature_dim": 16, "depth": 1, "hidden": 0}
#: name -> (n_cond, grid, window, cond_replicated, alpha_reference, running reference kept)
CASES: dict[str, tuple[int, tuple[int, int], int, bool, str, bool]] = {
    "window-call-mean": (4, (6, 5), 1, False, "call", False),
    "window-running": (3, (5, 6), 1, False, "running", True),
    "landmarks-only": (4, (4, 6), 0, False, "call", False),
    "replicated-text": (4, (6, 5), 1, True, "call", False),
    # 4 ranks: 8, 8, 7, 7 image tokens on a 5 x 6 grid; rank 1's band (rows 0-3) reaches into ranks 0, 2 and 3
    "uneven-4": (5, (5, 6), 1, False, "call", False),
}
TWO = ("window-call-mean", "window-running", "landmarks-only", "replicated-text")


def build(name: str, kernel: str) -> tuple[TtrBackend, torch.Tensor, torch.Tensor, torch.Tensor, AttentionCall]:
    n_cond, grid, window, _, reference, running = CASES[name]
    torch.manual_seed(3)
    landmark = LandmarkBackend(LandmarkSettings(fraction=0.15, min=4, window=window))
    backend = TtrBackend(TtrSettings(alpha_reference=reference, kernel=kernel, **SMALL), landmark=landmark)
    layer = backend.layer(LayerSpec("single:0", H, D))
    if running:
        layer.set_d_reference(torch.tensor([0.3, 0.5]))
    n = n_cond + grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    call = AttentionCall("single:0", "single", 0, sigma=0.7, step_index=0, n_cond_tokens=n_cond,
                         n_image_tokens=grid[0] * grid[1], latent_grid=grid, host="test")
    return backend, q, k, v, call


def local(name: str, call: AttentionCall, rank: int, world: int) -> tuple[AttentionCall, torch.Tensor]:
    n_cond, grid, _, replicated, _, _ = CASES[name]
    shard = SequenceShard.split(n_cond, grid[0] * grid[1], rank, world, cond_replicated=replicated)
    return (call.with_(n_cond_tokens=shard.cond_sizes[rank], n_image_tokens=shard.image_sizes[rank], shard=shard),
            shard.global_index(rank))


def _worker(rank: int, world: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    os.environ["TRITON_INTERPRET"] = "1"
    out = {}
    for name in names:
        backend, q, k, v, call = build(name, "triton")
        shard_call, rows = local(name, call, rank, world)
        out[name] = backend.forward(q[:, :, rows], k[:, :, rows], v[:, :, rows], shard_call)
        entries = backend.layers["single:0"].serve_cache.entries
        assert any(isinstance(e.plan, ShardedPlan) for e in entries.values()), name
    return out


def _check(results: list[dict[str, torch.Tensor]], names: tuple[str, ...], world: int) -> None:
    for name in names:
        backend, q, k, v, call = build(name, "torch")
        expected = backend.forward(q, k, v, call)
        for rank, got in enumerate(results):
            _, rows = local(name, call, rank, world)
            torch.testing.assert_close(got[name], expected[:, :, rows], rtol=2e-4, atol=2e-4, msg=name)


@interpreted
def test_fused_sharded_layer_equals_the_single_process_layer(tmp_path: Path) -> None:
    _check(run_ranks(_worker, 2, tmp_path, TWO), TWO, 2)


@interpreted
def test_four_uneven_ranks_with_a_halo_across_several_shards(tmp_path: Path) -> None:
    _check(run_ranks(_worker, 4, tmp_path, ("uneven-4",)), ("uneven-4",), 4)


def test_dispatch_takes_the_fused_plan_where_the_kernels_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnplug.plugins.ttr import backend as backend_module

    name = "window-call-mean"
    for kernel in ("auto", "torch"):
        backend, q, k, v, call = build(name, kernel)
        shard_call, rows = local(name, call, 0, 2)
        layer = backend.layer(LayerSpec("single:0", H, D))
        plan, reasons = backend._sharded_plan(layer, layer.weights_signature(), q[:, :, rows], k[:, :, rows],
                                              v[:, :, rows], shard_call, backend.residual())
        assert plan is None and reasons == (), kernel  # a CPU under 'auto', and 'torch': the PyTorch path
    backend, q, k, v, call = build(name, "triton")
    shard_call, rows = local(name, call, 0, 2)
    layer = backend.layer(LayerSpec("single:0", H, D))
    monkeypatch.setattr("attnplug.plugins.ttr.kernels.fused_unsupported_reasons", lambda *a, **kw: [])
    plan, _ = backend._sharded_plan(layer, layer.weights_signature(), q[:, :, rows], k[:, :, rows], v[:, :, rows],
                                    shard_call, backend.residual())
    assert isinstance(plan, ShardedPlan)
    # the local sequence: this rank's 2 text tokens, then grid rows 0..3 (its 15 image tokens are rows 0-2, plus one
    # halo row), keys [text | band | landmark rows]
    assert (plan.n_cond, plan.offset, plan.n_v) == (2, 0, 2 + 4 * 5)
    assert plan.query_plan.s_scale == 1.0 / (4 + 30) and plan.query_plan.modes == (2, 3)
    layer.serve_cache.valid_for(None, None)
    monkeypatch.setattr("attnplug.plugins.ttr.kernels.fused_unsupported_reasons", lambda *a, **kw: ["no GPU"])
    with pytest.raises(ValueError, match="no GPU"):
        backend.forward(q[:, :, rows], k[:, :, rows], v[:, :, rows], shard_call)
    assert backend_module.ShardedPlan is ShardedPlan
