"""Exact softmax attention against a gathered set of landmark keys, in fp32 (plain PyTorch reference).

The Triton work (plugins/ttr/kernels) may fuse this; it must match `landmark_softmax`.
"""
from __future__ import annotations

import torch


def gather_landmarks(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of `x [B, H, Nk, D]` at landmark indices: `idx [L]` (shared) or `[B, L]` → `[B, H, L, D]`."""
    if idx.dim() == 1:
        return x.index_select(2, idx)
    b, h, _, d = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


def landmark_softmax(q: torch.Tensor, k_l: torch.Tensor, v_l: torch.Tensor, valid: torch.Tensor | None = None,
                     scale: float | None = None, chunk: int = 4096) -> torch.Tensor:
    """`softmax(q k_lᵀ · scale) v_l` in fp32, chunked over queries.

    :param q: `[B, H, Nq, D]` (any float dtype; computed in fp32).
    :param k_l: `[B, H, L, D]` landmark keys.
    :param v_l: `[B, H, L, Dv]` landmark values.
    :param valid: `[B, L]` bool (True = a real landmark) or None.
    :param scale: logit scale, default `D ** -0.5`.
    :param chunk: queries per chunk; bounds the `[B, H, chunk, L]` fp32 logits.
    :return: `[B, H, Nq, Dv]` fp32. A query whose batch element has no valid landmark gets zeros.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k_l.float()
    vf = v_l.float()
    bias = None
    if valid is not None:
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill(~valid.to(q.device), float("-inf"))[:, None, None, :]
    outs = []
    for start in range(0, q.shape[2], chunk):
        logits = torch.matmul(q[:, :, start:start + chunk].float(), kf.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias
        if logits.shape[-1] == 0:
            outs.append(logits.new_zeros(*logits.shape[:-1], vf.shape[-1]))
            continue
        weights = torch.softmax(logits, dim=-1)
        if bias is not None:  # rows with no valid landmark are all -inf → NaN; make them zero
            weights = torch.nan_to_num(weights, nan=0.0)
        outs.append(torch.matmul(weights, vf))
    if not outs:
        return q.new_zeros(*q.shape[:-1], v_l.shape[-1], dtype=torch.float32)
    return torch.cat(outs, dim=2)
