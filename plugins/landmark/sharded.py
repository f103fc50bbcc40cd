"""The landmark branch of a sequence-parallel call (`core.shard`): this rank's rows of the single-process branch.

Every rank selects the landmarks of the whole sequence (the same global indices as one process would), and gathers
their K/V rows from the ranks that hold them (one all-gather of `[k, v]`). With the local window, an image query
needs the image keys within r grid rows and columns of its own position: this rank's image rows plus `r·w + r`
rows of its neighbours on either side (`core.shard.image_band`, one all-gather of every shard's edge rows). The
softmax is then the single-process one over the same keys in the same order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...core.call import AttentionCall
from ...core.shard import SequenceShard, gather_rows, image_band
from .attention import landmark_softmax, landmark_window_softmax

if TYPE_CHECKING:
    from .backend import LandmarkBackend


def global_call(call: AttentionCall, shard: SequenceShard) -> AttentionCall:
    """The call as one process would see it: the whole sequence's token counts, no shard."""
    return call.with_(n_cond_tokens=shard.n_cond, n_image_tokens=shard.n_image, shard=None)


def sharded_selection(backend: "LandmarkBackend", call: AttentionCall,
                      device: torch.device) -> tuple[torch.Tensor, int, tuple[int, int] | None]:
    """`(idx [L], radius, grid)`: the whole sequence's landmark indices (global order, on `device`) and its window
    decision — what one process would use for the same call (`radius` 0: landmarks only)."""
    shard = call.shard
    assert shard is not None, "sharded_selection needs call.shard"
    whole = global_call(call, shard)
    idx = backend.shared_indices(shard.n_tokens, whole, device)
    proxy = torch.empty((1, 1, shard.n_tokens, 0), device="meta")  # the decision reads the sequence's length only
    radius, grid = backend.window_plan(proxy, proxy, whole)
    return idx, radius, grid


def sharded_branch(backend: "LandmarkBackend", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   call: AttentionCall) -> torch.Tensor:
    """`[B, H, n_local, Dv]` fp32: this rank's rows of `backend.branch()` on the whole sequence (no mask), in fp32:
    `precision = "fp8"` is not applied here (its value scale spans every rank's keys; warned once)."""
    shard = call.shard
    assert shard is not None, "sharded_branch needs call.shard"
    if backend.settings.precision == "fp8":
        backend._warn_once("sharded-fp8", "precision = 'fp8' is not applied to sequence-parallel "
                           "calls; they compute the exact softmax in full precision")
    whole = global_call(call, shard)
    idx, radius, grid = sharded_selection(backend, call, k.device)
    dk = k.shape[-1]
    kv = torch.cat([k, v.to(k.dtype)], dim=-1)
    kv_l = gather_rows(kv, idx, shard)
    k_l, v_l = kv_l[..., :dk], kv_l[..., dk:]
    scale = q.shape[-1] ** -0.5
    chunk = backend.settings.query_chunk
    if radius == 0:
        return landmark_softmax(q, k_l, v_l, None, scale, chunk)
    assert grid is not None
    n_cond_here = shard.cond_sizes[shard.rank]
    band, start = image_band(kv[:, :, n_cond_here:], radius * grid[1] + radius, shard)
    win_idx, win_ok = _window_rows(backend, shard, whole, idx, grid, start, k.device)
    out_img = landmark_window_softmax(q[:, :, n_cond_here:], band[..., :dk], band[..., dk:], k_l, v_l, None,
                                      win_idx, win_ok, scale, chunk)
    if n_cond_here == 0:
        return out_img
    return torch.cat([landmark_softmax(q[:, :, :n_cond_here], k_l, v_l, None, scale, chunk), out_img], dim=2)


def _window_rows(backend: "LandmarkBackend", shard: SequenceShard, whole: AttentionCall, idx: torch.Tensor,
                 grid: tuple[int, int], start: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(win_idx [n_img_local, W], win_ok [1, n_img_local, W])`: this rank's image queries' windows as positions in
    the band that starts at image token `start`; an entry counts inside the grid and where the key is no landmark
    (as `LandmarkBackend._window_rows` on one process). Cached per shape and shard."""
    key = ("sharded", backend._shape_key(shard.n_tokens, whole, device), shard, start)
    hit = backend.rows_cache_get(key)
    if hit is not None:
        return hit
    table, inside = backend.window_table(grid, 0, device)  # image-token coordinates
    lo, hi = shard.image_range()
    rows, ok = table[lo:hi], inside[lo:hi]
    is_lm = torch.zeros(shard.n_image, dtype=torch.bool, device=device)
    img_lm = idx[idx >= shard.n_cond] - shard.n_cond
    is_lm[img_lm] = True
    hit = (rows - start, (ok & ~is_lm[rows])[None])
    return backend.rows_cache_put(key, hit)
