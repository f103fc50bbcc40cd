"""The distiller trains a windowed landmark branch on query subsets: the subset's positions reach the branch."""
from __future__ import annotations

import logging

import pytest
import torch
from attnplug.core import AttentionCall, LayerSpec, Plugins, Session
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.landmark.settings import LandmarkSettings
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.settings import TtrSettings

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (4, 6)
N_COND = 3


def _call() -> AttentionCall:
    return AttentionCall("single:1", n_cond_tokens=N_COND, n_image_tokens=GRID[0] * GRID[1], latent_grid=GRID,
                         sigma=0.6, step_index=0, host="test")


def test_train_forward_on_a_query_subset_equals_those_rows_of_the_full_forward(caplog) -> None:
    landmark = LandmarkBackend(LandmarkSettings(fraction=0.1, min=3, window=2))
    # fixed α: an adaptive α uses the mean over the call's queries, which a subset changes by design
    ttr = TtrBackend(TtrSettings(kernel="torch", feature_dim=16, hidden=32, adaptive_alpha=False),
                     landmark=landmark.branch)
    layer = ttr.layer(LayerSpec("single:1", 2, 8), torch.device("cpu"))
    with torch.no_grad():
        layer.alpha_logit.fill_(2.0)  # a large landmark/window share: a wrong window would show
    q, k, v = (torch.randn(1, 2, N_COND + GRID[0] * GRID[1], 8) for _ in range(3))
    rows = torch.tensor([0, 2, 4, 9, 17, 26])  # text and image queries, borders included
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        full = ttr.train_forward("single:1", q, k, v, _call())
        part = ttr.train_forward("single:1", q[:, :, rows], k, v, _call(), query_index=rows)
        blind = ttr.train_forward("single:1", q[:, :, rows], k, v, _call())  # no positions: landmarks only
    torch.testing.assert_close(part, full[:, :, rows], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(blind, full[:, :, rows], atol=1e-3)
    assert sum("query_index" in r.getMessage() for r in caplog.records) == 1  # only the blind call warns


def test_distillation_with_a_window_and_a_query_cap_passes_positions(caplog) -> None:
    cfg = {"backend": "ttr", "exact": "sdpa", "training": True, "distiller": "ttr", "loggers": [], "seed": 0,
           "plugins": {"ttr": {"feature_dim": 16, "hidden": 32, "kernel": "torch"},
                       "landmark": {"fraction": 0.1, "min": 3, "window": 2},
                       "distill": {"query_cap": 8, "log_every": 0, "layer_log_every": 0}}}
    session = Session(cfg, Plugins(load_entry_points=False))
    q, k, v = (torch.randn(1, 2, N_COND + GRID[0] * GRID[1], 8) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        for step in range(3):
            session.attention(q, k, v, _call().with_(step_index=step))
    distiller = session.distiller
    samples = [s for queue in distiller.replay.queues.values() for s in queue]
    assert samples and all(s.query_index is not None and s.query_index.numel() == 8 for s in samples)
    assert distiller.total_updates > 0
    assert not [r for r in caplog.records if "window" in r.getMessage()], [r.getMessage() for r in caplog.records]
