"""Which keys are landmarks: every conditioning token plus an image-token budget.

Indices are positions in the key sequence (conditioning tokens first, then image tokens, the
attnplug convention). Without a mask one index set serves the whole batch and every head; with a
key-padding mask each batch element gets its own set of valid keys, padded to a common length
and flagged by a validity mask.
"""
from __future__ import annotations

import math

import torch


def image_budget(n_img: int, fraction: float, min_count: int, max_count: int) -> int:
    """`clamp(round(n_img * fraction), min, max)`, `max_count = 0` meaning unlimited.

    This is the budget *before* capping at the image tokens present (the caller caps), so
    defaults give 64 / 82 / 184 / 328 for 0 / 1024 / 2304 / 4096 image tokens and 800 for 10000.
    Python's `round` rounds half to even; 0.08 * n is never exactly .5 for the sizes above.
    """
    if n_img < 0:
        raise ValueError(f"image_budget: n_img must be >= 0, got {n_img}")
    budget = max(int(round(n_img * fraction)), min_count)
    if max_count > 0:
        budget = min(budget, max_count)
    return budget


def even_positions(n: int, count: int) -> torch.Tensor:
    """`count` distinct, evenly spaced positions in `[0, n)`: the centres of `count` equal bins.

    `floor((i + 0.5) * n / count)` is strictly increasing when `count <= n`, so there are no
    duplicates and the count is exact.
    """
    count = min(count, n)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    i = torch.arange(count, dtype=torch.float64)
    return torch.floor((i + 0.5) * (n / count)).to(torch.long).clamp_(max=n - 1)


def stratified_positions(grid: tuple[int, int], count: int) -> torch.Tensor:
    """`count` positions in a row-major `h x w` grid, one per cell of a ~square 2-D partition.

    The grid is split into `gh x gw` strata (`gh/gw` close to `h/w`, `gh * gw >= count`); each
    stratum contributes its centre; when there are more strata than `count`, an evenly spaced
    subset of them (in row-major order) is kept. Deterministic, exact count, no duplicates.
    """
    h, w = grid
    n = h * w
    count = min(count, n)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    gh = max(1, min(h, round(math.sqrt(count * h / w))))
    gw = max(1, min(w, math.ceil(count / gh)))
    while gh * gw < count:  # clamping at h or w can leave too few strata
        if gh < h:
            gh += 1
        else:
            gw += 1
    rows = torch.floor((torch.arange(gh, dtype=torch.float64) + 0.5) * (h / gh)).long()
    cols = torch.floor((torch.arange(gw, dtype=torch.float64) + 0.5) * (w / gw)).long()
    cells = (rows[:, None] * w + cols[None, :]).reshape(-1)
    if cells.numel() > count:
        cells = cells[even_positions(cells.numel(), count)]
    return cells


def select_landmarks(n_keys: int, n_cond: int, fraction: float, min_count: int, max_count: int,
                     layout: str = "even", grid: tuple[int, int] | None = None,
                     key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Landmark key indices for one call.

    :param n_keys: keys in the sequence.
    :param n_cond: conditioning tokens at the front (all become landmarks); clamped to `n_keys`.
        Every key after them counts as an image token.
    :param layout: `"even"` or `"stratified"` (needs `grid` with `h * w` equal to the image tokens,
        else falls back to `"even"`).
    :param key_mask: `[B, Nk]` bool, True = valid key, or None.
    :return: `(idx, valid)`. Without a mask: `idx [L]` long, `valid None`. With a mask:
        `idx [B, L]` and `valid [B, L]` bool; each row holds that element's valid conditioning keys
        and its image budget spread evenly over its valid image keys, padded with index 0 / False.
    """
    n_cond = max(0, min(n_cond, n_keys))
    n_img = n_keys - n_cond
    budget = min(image_budget(n_img, fraction, min_count, max_count), n_img)
    cond = torch.arange(n_cond, dtype=torch.long)
    if key_mask is None:
        if layout == "stratified" and grid is not None and grid[0] * grid[1] == n_img:
            img = stratified_positions(grid, budget)
        else:
            img = even_positions(n_img, budget)
        return torch.cat([cond, img + n_cond]), None
    if key_mask.dim() != 2 or key_mask.shape[1] != n_keys:
        raise ValueError(f"select_landmarks: key_mask must be [B, {n_keys}] bool, got {tuple(key_mask.shape)}")
    keep = key_mask.detach().to("cpu", torch.bool)
    rows: list[torch.Tensor] = []
    for b in range(keep.shape[0]):
        valid_cond = torch.nonzero(keep[b, :n_cond]).flatten()
        valid_img = torch.nonzero(keep[b, n_cond:]).flatten()
        if valid_img.numel() == n_img and layout == "stratified" and grid is not None and grid[0] * grid[1] == n_img:
            img = stratified_positions(grid, budget)
        else:
            img = valid_img[even_positions(valid_img.numel(), budget)]
        rows.append(torch.cat([valid_cond, img + n_cond]))
    length = max((r.numel() for r in rows), default=0)
    idx = torch.zeros(keep.shape[0], length, dtype=torch.long)
    valid = torch.zeros(keep.shape[0], length, dtype=torch.bool)
    for b, r in enumerate(rows):
        idx[b, :r.numel()] = r
        valid[b, :r.numel()] = True
    return idx, valid
