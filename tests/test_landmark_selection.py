"""Landmark selection: budget numbers, caps, layouts, key padding."""
from __future__ import annotations

import pytest
import torch

from attnplug.plugins.landmark.selection import (even_positions, image_budget, select_landmarks,
                                                 stratified_positions)
from attnplug.plugins.landmark.settings import PREVIOUS_DEFAULTS, LandmarkSettings


@pytest.mark.parametrize("n_img, expected", [(0, 64), (1024, 82), (2304, 184), (4096, 328), (10000, 800)])
def test_budget_of_the_previous_default(n_img: int, expected: int) -> None:
    """The previous default's budget (0.08 / 64 / unlimited, the earlier node pack's; `PREVIOUS_DEFAULTS`)."""
    s = LandmarkSettings(**PREVIOUS_DEFAULTS)
    assert (s.fraction, s.min, s.max, s.window) == (0.08, 64, 0, 0)
    assert image_budget(n_img, s.fraction, s.min, s.max) == expected


@pytest.mark.parametrize("n_img, expected", [(0, 16), (1024, 20), (4096, 82), (16384, 328), (65536, 1311)])
def test_budget_at_defaults(n_img: int, expected: int) -> None:
    """The default: 2 % of the image tokens, at least 16, unlimited, with the local window r = 2."""
    s = LandmarkSettings()
    assert (s.fraction, s.min, s.max, s.window, s.layout) == (0.02, 16, 0, 2, "even")
    assert image_budget(n_img, s.fraction, s.min, s.max) == expected


def test_budget_with_max() -> None:
    assert image_budget(10000, 0.08, 64, 512) == 512
    assert image_budget(1024, 0.08, 64, 512) == 82


@pytest.mark.parametrize("n_cond, n_img", [(7, 0), (7, 40), (16, 1024), (0, 2304), (512, 4096)])
def test_selected_set_is_capped_budget_plus_all_conditioning(n_cond: int, n_img: int) -> None:
    idx, valid = select_landmarks(n_cond + n_img, n_cond, 0.08, 64, 0)
    assert valid is None
    expected_img = min(image_budget(n_img, 0.08, 64, 0), n_img)
    assert idx.numel() == n_cond + expected_img
    assert torch.equal(idx[:n_cond], torch.arange(n_cond))
    img = idx[n_cond:]
    assert bool((img >= n_cond).all()) and bool((img < n_cond + n_img).all())
    assert img.unique().numel() == img.numel()


def test_even_positions_spread() -> None:
    pos = even_positions(1024, 82)
    assert pos.numel() == 82 and bool((pos.diff() > 0).all())
    gaps = pos.diff()
    assert int(gaps.max()) - int(gaps.min()) <= 1
    assert torch.equal(even_positions(5, 9), torch.arange(5))


@pytest.mark.parametrize("grid, count", [((32, 32), 82), ((16, 48), 64), ((8, 8), 64), ((3, 40), 10), ((1, 7), 3)])
def test_stratified_covers_both_axes(grid: tuple[int, int], count: int) -> None:
    h, w = grid
    pos = stratified_positions(grid, count)
    assert pos.numel() == min(count, h * w) and pos.unique().numel() == pos.numel()
    assert bool((pos >= 0).all()) and bool((pos < h * w).all())
    rows, cols = pos // w, pos % w
    if count >= 4 and min(h, w) >= 8:  # thin grids get one row of near-square strata
        # every half of the grid gets landmarks, along both axes
        assert bool((rows < h / 2).any()) and bool((rows >= h / 2).any())
        assert bool((cols < w / 2).any()) and bool((cols >= w / 2).any())


def test_stratified_layout_differs_from_even_and_falls_back_without_grid() -> None:
    strat, _ = select_landmarks(16 + 1024, 16, 0.08, 64, 0, "stratified", (32, 32))
    even, _ = select_landmarks(16 + 1024, 16, 0.08, 64, 0, "even", (32, 32))
    assert strat.numel() == even.numel() == 16 + 82
    assert not torch.equal(strat, even)
    cols = (strat[16:] - 16) % 32
    assert cols.unique().numel() > 4  # evenly spaced 1-D picks would hit few distinct columns
    fallback, _ = select_landmarks(16 + 1024, 16, 0.08, 64, 0, "stratified", None)
    assert torch.equal(fallback, even)


def test_key_padding_selects_only_valid_keys() -> None:
    n_cond, n_img = 8, 200
    keep = torch.ones(3, n_cond + n_img, dtype=torch.bool)
    keep[1, 3:8] = False  # padded text
    keep[2, n_cond + 50:] = False  # padded image tail
    idx, valid = select_landmarks(n_cond + n_img, n_cond, 0.08, 64, 0, key_mask=keep)
    assert idx.shape == valid.shape and idx.shape[0] == 3
    for b in range(3):
        chosen = idx[b][valid[b]]
        assert bool(keep[b, chosen].all()), b
    assert int(valid[0].sum()) == 8 + 64
    assert int(valid[1].sum()) == 3 + 64
    assert int(valid[2].sum()) == 8 + 50  # budget capped at the valid image keys


def test_settings_reject_min_above_max() -> None:
    with pytest.raises(ValueError, match="min 100 > max 50"):
        LandmarkSettings(min=100, max=50)
    LandmarkSettings(min=100, max=0)  # 0 = unlimited
