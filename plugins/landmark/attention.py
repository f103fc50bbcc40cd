"""Exact softmax attention against a gathered set of landmark keys, in fp32 (plain PyTorch reference).

`landmark_softmax`: every query sees the same landmarks. `landmark_window_softmax`: each query also
sees its own window of keys (the local 2-D window of `window_table`), in one joint softmax. Both can
also return each row's log-sum-exp (`return_lse`), which a layer that puts the exact set and a learned
far field under one normaliser needs.
The Triton work (plugins/ttr/kernels) fuses both into the ttr layer's landmark pass and must match them
(tests/test_ttr_fused_window.py). Given the values' scale (`v_scale`), both round their products' inputs to e4m3
first, as the kernels do with `[plugins.landmark] precision = "fp8"` (core/exact_fp8.py).
"""
from __future__ import annotations

import torch

from ...core.exact_fp8 import round_inputs, round_rows, round_values, rounded_softmax


def gather_landmarks(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of `x [B, H, Nk, D]` at landmark indices: `idx [L]` (shared) or `[B, L]` → `[B, H, L, D]`."""
    if idx.dim() == 1:
        return x.index_select(2, idx)
    b, h, _, d = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


def softmax_or_zero(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where a row of all -inf (no key may be attended) gives zeros — in the
    forward and the backward (a plain softmax gives NaN there, and NaN gradients even when masked)."""
    empty = torch.isneginf(logits).all(dim=-1, keepdim=True)
    return torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def logsumexp_or_neginf(logits: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the last dim; a row of all -inf (or no entries) gives -inf with a zero gradient
    (a plain logsumexp's backward is NaN there)."""
    if logits.shape[-1] == 0:
        return logits.new_full(logits.shape[:-1], float("-inf"))
    empty = torch.isneginf(logits).all(dim=-1)
    return torch.logsumexp(logits.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty, float("-inf"))


def landmark_softmax(q: torch.Tensor, k_l: torch.Tensor, v_l: torch.Tensor, valid: torch.Tensor | None = None,
                     scale: float | None = None, chunk: int = 4096, return_lse: bool = False,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`softmax(q k_lᵀ · scale) v_l` in fp32, chunked over queries.

    :param q: `[B, H, Nq, D]` (any float dtype; computed in fp32).
    :param k_l: `[B, H, L, D]` landmark keys.
    :param v_l: `[B, H, L, Dv]` landmark values.
    :param valid: `[B, L]` bool (True = a real landmark) or None.
    :param scale: logit scale, default `D ** -0.5`.
    :param chunk: queries per chunk; bounds the `[B, H, chunk, L]` fp32 logits.
    :param return_lse: also return the log-sum-exp of each row's scaled logits, `[B, H, Nq]` fp32.
    :param v_scale: FP8 (core/exact_fp8.py): the values' per-channel scale `[B, H, 1, Dv]` over every key
        (`value_scale(v)`); q, k_l, v_l and the probabilities are then rounded to e4m3. None: no rounding.
    :return: `[B, H, Nq, Dv]` fp32 (and the log-sum-exp). A query whose batch element has no valid
        landmark gets zeros (and zero gradients; its log-sum-exp is -inf).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fp8 = v_scale is not None
    if fp8:
        q, k_l, v_l = round_inputs(q, k_l, v_l, v_scale)
    kf = k_l.float()
    vf = v_l.float()
    bias = None
    if valid is not None:
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill(~valid.to(q.device), float("-inf"))[:, None, None, :]
    outs, lses = [], []
    for start in range(0, q.shape[2], chunk):
        logits = torch.matmul(q[:, :, start:start + chunk].float(), kf.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias
        if return_lse:
            lses.append(logsumexp_or_neginf(logits))
        if logits.shape[-1] == 0:
            outs.append(logits.new_zeros(*logits.shape[:-1], vf.shape[-1]))
            continue
        if fp8:
            weights = rounded_softmax(logits)
        else:
            weights = softmax_or_zero(logits) if bias is not None else torch.softmax(logits, dim=-1)
        outs.append(torch.matmul(weights, vf))
    if not outs:
        out = q.new_zeros(*q.shape[:-1], v_l.shape[-1], dtype=torch.float32)
        return (out, q.new_zeros(q.shape[:-1], dtype=torch.float32)) if return_lse else out
    out = torch.cat(outs, dim=2)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def window_table(grid: tuple[int, int], radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image token's `(2r+1)²` window on a row-major `h x w` grid.

    :param grid: `(h, w)` of the latent grid.
    :param radius: Chebyshev radius `r >= 0`.
    :return: `(idx, valid)`, both `[h*w, (2r+1)²]`: `idx` long image-token indices (offsets in
        row-major order, dy outer, dx inner); `valid` bool, False where the offset leaves the grid
        (such entries hold a clamped, in-grid index so that gathers stay in bounds).
    """
    h, w = grid
    if h <= 0 or w <= 0 or radius < 0:
        raise ValueError(f"window_table: grid must be positive and radius >= 0, got grid {grid}, radius {radius}")
    offsets = torch.arange(-radius, radius + 1)
    dy = offsets.repeat_interleave(offsets.numel())
    dx = offsets.repeat(offsets.numel())
    y = torch.arange(h).repeat_interleave(w)[:, None] + dy[None, :]
    x = torch.arange(w).repeat(h)[:, None] + dx[None, :]
    valid = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    idx = y.clamp(0, h - 1) * w + x.clamp(0, w - 1)
    return idx, valid


def landmark_window_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_l: torch.Tensor,
                            v_l: torch.Tensor, valid: torch.Tensor | None, win_idx: torch.Tensor,
                            win_ok: torch.Tensor, scale: float | None = None, chunk: int = 4096,
                            return_lse: bool = False, v_scale: torch.Tensor | None = None
                            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax over `[landmarks, the query's window keys]` jointly, in fp32, chunked over queries.

    Window keys are gathered per query chunk (`[B, H, chunk, W, D]`), so memory is bounded by the
    chunk, not by `Nq · W`. Logits of window entries with `win_ok` False are -inf: the caller marks
    there what must not count (outside the grid, already a landmark, a padded key, a query without
    a window).

    :param q: `[B, H, Nq, D]` (any float dtype; computed in fp32).
    :param k: `[B, H, Nk, D]`, :param v: `[B, H, Nk, Dv]` — all keys and values (window keys are
        gathered from them).
    :param k_l: `[B, H, L, D]` landmark keys; :param v_l: `[B, H, L, Dv]` landmark values.
    :param valid: `[B, L]` bool (True = a real landmark) or None.
    :param win_idx: `[Nq, W]` long key indices of each query's window.
    :param win_ok: `[Bm, Nq, W]` bool, `Bm` 1 or B: True where the window entry counts.
    :param scale: logit scale, default `D ** -0.5`.
    :param chunk: queries per chunk.
    :param return_lse: also return the log-sum-exp of each row's scaled logits over the keys that count,
        `[B, H, Nq]` fp32.
    :param v_scale: FP8, as `landmark_softmax` (the window's keys and values are rounded too).
    :return: `[B, H, Nq, Dv]` fp32 (and the log-sum-exp). A query with no key that counts gets zeros (and
        zero gradients; its log-sum-exp is -inf).
    """
    b, h, nq, d = q.shape
    n_win = win_idx.shape[-1]
    if win_idx.shape != (nq, n_win) or win_ok.dim() != 3 or win_ok.shape[1:] != (nq, n_win) \
            or win_ok.shape[0] not in (1, b):
        raise ValueError(f"landmark_window_softmax: win_idx must be [{nq}, W] and win_ok [1 or {b}, {nq}, W], "
                         f"got {tuple(win_idx.shape)} and {tuple(win_ok.shape)}")
    scale = d ** -0.5 if scale is None else scale
    fp8 = v_scale is not None
    if fp8:
        q, k_l, v_l = round_inputs(q, k_l, v_l, v_scale)
    kf_l = k_l.float()
    vf_l = v_l.float()
    n_l = kf_l.shape[2]
    bias_l = None
    if valid is not None:
        bias_l = torch.zeros(valid.shape, dtype=torch.float32, device=q.device)
        bias_l = bias_l.masked_fill(~valid.to(q.device), float("-inf"))[:, None, None, :]
    # a row can be empty only when masks remove keys, or when there are no landmarks at all
    may_be_empty = valid is not None or n_l == 0
    win_idx = win_idx.to(q.device)
    win_ok = win_ok.to(q.device)
    outs, lses = [], []
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        rows = stop - start
        qc = q[:, :, start:stop].float()
        flat = win_idx[start:stop].reshape(-1)
        k_w = k.index_select(2, flat).view(b, h, rows, n_win, d).float()
        v_w = v.index_select(2, flat).view(b, h, rows, n_win, v.shape[-1]).float()
        if fp8:
            k_w, v_w = round_rows(k_w), round_values(v_w, v_scale)
        logits_l = torch.matmul(qc, kf_l.transpose(-1, -2)) * scale  # [B, H, c, L]
        if bias_l is not None:
            logits_l = logits_l + bias_l
        logits_w = torch.einsum("bhcd,bhcwd->bhcw", qc, k_w) * scale  # [B, H, c, W]
        logits_w = logits_w.masked_fill(~win_ok[:, None, start:stop], float("-inf"))
        logits = torch.cat([logits_l, logits_w], dim=-1)
        if return_lse:
            lses.append(logsumexp_or_neginf(logits))
        if fp8:
            weights = rounded_softmax(logits)
        else:
            weights = softmax_or_zero(logits) if may_be_empty else torch.softmax(logits, dim=-1)
        out = torch.einsum("bhcw,bhcwd->bhcd", weights[..., n_l:], v_w)
        if n_l:
            out = out + torch.matmul(weights[..., :n_l], vf_l)
        outs.append(out)
    if not outs:
        out = q.new_zeros(b, h, nq, v.shape[-1], dtype=torch.float32)
        return (out, q.new_zeros(b, h, nq, dtype=torch.float32)) if return_lse else out
    out = torch.cat(outs, dim=2)
    return (out, torch.cat(lses, dim=2)) if return_lse else out
