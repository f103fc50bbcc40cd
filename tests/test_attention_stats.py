"""testbed.attention_stats: the metrics on tiny synthetic attention whose answer is known."""
from __future__ import annotations

import math

import pytest
import torch

from attnplug.core import AttentionCall
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.testbed.attention_stats import (STATS_LANDMARKS, attention_metrics, landmark_indices,
                                              metric_names)

N_COND, GRID, CELL = 4, (4, 4), 2  # 4 text tokens = one per 2×2 cell of a 4×4 image grid
N = N_COND + GRID[0] * GRID[1]
LANDMARKS = torch.cat([torch.arange(N_COND), N_COND + torch.arange(8)])  # all text + image tokens 0..7


def _metrics(targets: torch.Tensor | None) -> dict[str, float]:
    """Image query i attends (almost) only to key `targets[i]`; None: uniform attention."""
    k = torch.eye(N)[None, None]  # key j = e_j
    q = torch.zeros(1, 1, N, N)
    if targets is not None:
        q[0, 0, N_COND + torch.arange(len(targets)), targets] = 400.0
    return attention_metrics(q, k, N_COND, GRID, cell=CELL, landmarks=LANDMARKS, radii=(1,), topk=(1, 16))


def test_attention_on_itself_is_sharp_and_local() -> None:
    m = _metrics(N_COND + torch.arange(16))
    assert set(m) == set(metric_names((1,), (1, 16)))
    assert m["entropy"] == pytest.approx(0.0, abs=1e-3)
    assert m["entropy_ratio"] == pytest.approx(0.0, abs=1e-3)
    for name in ("local_r1", "cell_mass", "landmark_local_r1", "top1", "top16"):
        assert m[name] == pytest.approx(1.0, abs=1e-3), name
    assert m["text_mass"] == pytest.approx(0.0, abs=1e-3)
    assert m["landmark_mass"] == pytest.approx(0.5, abs=1e-3)  # image tokens 0..7 of 16 are landmarks


def test_attention_on_own_cell_text_token() -> None:
    pos = torch.arange(16)
    cell = (pos // 4 // CELL) * 2 + pos % 4 // CELL
    m = _metrics(cell)
    assert m["text_mass"] == pytest.approx(1.0, abs=1e-3)
    assert m["own_text_mass"] == pytest.approx(1.0, abs=1e-3)
    assert m["landmark_mass"] == pytest.approx(1.0, abs=1e-3)
    assert m["local_r1"] == pytest.approx(0.0, abs=1e-3)


def test_uniform_attention() -> None:
    m = _metrics(None)
    assert m["entropy"] == pytest.approx(math.log(N), rel=1e-5)
    assert m["entropy_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert m["text_mass"] == pytest.approx(N_COND / N, abs=1e-5)
    assert m["own_text_mass"] == pytest.approx(1 / N, abs=1e-5)
    # 3×3 windows on a 4×4 grid: 4 corners × 4 + 8 edges × 6 + 4 inner × 9 = 100 keys over 16 queries
    assert m["local_r1"] == pytest.approx(100 / 16 / N, abs=1e-5)
    assert m["cell_mass"] == pytest.approx(4 / N, abs=1e-5)
    assert m["landmark_mass"] == pytest.approx(len(LANDMARKS) / N)
    assert m["top16"] == pytest.approx(16 / N, abs=1e-5)


def test_landmarks_are_the_landmark_backends() -> None:
    """The landmark backend's own selection with the settings docs/QUALITY.md's statistics were measured with
    (pinned: the previous default, 64 text + 82 image tokens on the testbed)."""
    k = torch.zeros(1, 1, 64 + 1024, 4)
    call = AttentionCall("single:1", n_cond_tokens=64, n_image_tokens=1024, latent_grid=(32, 32))
    assert (STATS_LANDMARKS.fraction, STATS_LANDMARKS.min, STATS_LANDMARKS.max) == (0.08, 64, 0)
    idx, _ = LandmarkBackend(STATS_LANDMARKS).indices(k, call)
    assert torch.equal(landmark_indices(64 + 1024, 64, (32, 32)), idx)
    assert idx.numel() == 64 + 82
