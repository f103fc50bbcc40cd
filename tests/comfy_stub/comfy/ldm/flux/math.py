"""Stand-in of `comfy/ldm/flux/math.py` → `attention`: RoPE, then `optimized_attention(..., skip_reshape=True)`.

As upstream, `optimized_attention` is bound by `from ... import` at module load, `heads = q.shape[1]`,
and the result is `[B, N, H*D]`. RoPE here is a plain rotation of feature pairs by `pe` (angles).
"""
from __future__ import annotations

import torch
from torch import Tensor

from comfy.ldm.modules.attention import optimized_attention


def apply_rope(xq: Tensor, xk: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate feature pairs of `[B, H, N, D]` q and k by angles `pe` `[N, D/2]`."""
    cos, sin = pe.cos(), pe.sin()

    def rot(x: Tensor) -> Tensor:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    return rot(xq), rot(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, mask=None, transformer_options={}) -> Tensor:  # noqa: B006, ANN001
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    heads = q.shape[1]
    return optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=transformer_options)
