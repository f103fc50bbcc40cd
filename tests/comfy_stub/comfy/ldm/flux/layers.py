"""Stand-in of `comfy/ldm/flux/layers.py`: `DoubleStreamBlock` and `SingleStreamBlock` (tiny, same call path).

Kept from upstream: q/k/v as `[B, H, L, D]` via `view(B, L, 3, H, -1).permute(2, 0, 3, 1, 4)`; streams
joined as [txt, img]; `extra_options = transformer_options.copy()` and, in double blocks,
`extra_options["img_slice"] = [txt_len, total_len]` (builds from 2026-02-16 on); the `attn1_patch` hooks
`p(q, k, v, pe=, attn_mask=, extra_options=)` returning a dict that may replace values; then
`attention(..., transformer_options=transformer_options)`; then `attn1_output_patch`; both blocks keep
`num_heads` and `hidden_size` as attributes. Left out: modulation, MLPs, norms.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .math import attention

#: emulate a build before `img_slice` existed (2026-02-16) when False
IMG_SLICE = True


def _patches(q, k, v, pe, attn_mask, transformer_options, extra_options):  # noqa: ANN001, ANN202
    for p in transformer_options.get("patches", {}).get("attn1_patch", []):
        out = p(q, k, v, pe=pe, attn_mask=attn_mask, extra_options=extra_options)
        q, k, v = out.get("q", q), out.get("k", k), out.get("v", v)
        pe, attn_mask = out.get("pe", pe), out.get("attn_mask", attn_mask)
    return q, k, v, pe, attn_mask


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.txt_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.img_proj = nn.Linear(hidden_size, hidden_size)
        self.txt_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, attn_mask=None,  # noqa: ANN001
                transformer_options={}) -> tuple[Tensor, Tensor]:  # noqa: B006
        extra_options = transformer_options.copy()
        iq = self.img_qkv(img)
        img_q, img_k, img_v = iq.view(iq.shape[0], iq.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        tq = self.txt_qkv(txt)
        txt_q, txt_k, txt_v = tq.view(tq.shape[0], tq.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        if IMG_SLICE:
            extra_options["img_slice"] = [txt.shape[1], q.shape[2]]
        q, k, v, pe, attn_mask = _patches(q, k, v, pe, attn_mask, transformer_options, extra_options)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        for p in transformer_options.get("patches", {}).get("attn1_output_patch", []):
            attn = p(attn, extra_options)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        return img + self.img_proj(img_attn) * vec, txt + self.txt_proj(txt_attn) * vec


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size)
        self.linear2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, attn_mask=None,  # noqa: ANN001
                transformer_options={}) -> Tensor:  # noqa: B006
        extra_options = transformer_options.copy()
        qkv = self.linear1(x)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v, pe, attn_mask = _patches(q, k, v, pe, attn_mask, transformer_options, extra_options)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        for p in transformer_options.get("patches", {}).get("attn1_output_patch", []):
            attn = p(attn, extra_options)
        return x + self.linear2(attn) * vec
