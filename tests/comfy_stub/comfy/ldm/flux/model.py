"""Stand-in of `comfy/ldm/flux/model.py` → `Flux`: `forward` (DIFFUSION_MODEL wrappers) and `forward_orig`.

Kept from upstream: `forward(x, timestep, context, y, guidance, ref_latents, control,
transformer_options, **kw)` runs the `DIFFUSION_MODEL` wrappers with `class_obj=self`;
`forward_orig` works on `transformer_options.copy()` and sets `total_blocks`, `block_type` and
`block_index` per block (builds from 2025-11-26 on) and, for single blocks,
`img_slice = [txt_len, txt_len + img_len]` (from 2026-02-16 on); image tokens come from 2×2 patches of the
latent. Left out: modulation, guidance/time embeddings beyond a scalar gate, controlnets, ref latents.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import comfy.patcher_extension

from . import layers
from .layers import DoubleStreamBlock, SingleStreamBlock

#: emulate a build before block info existed (2025-11-26) when False
BLOCK_INFO = True


class Flux(nn.Module):
    def __init__(self, in_channels: int = 4, context_dim: int = 16, hidden_size: int = 32, num_heads: int = 2,
                 depth: int = 2, depth_single_blocks: int = 2) -> None:
        super().__init__()
        self.patch_size = 2
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_in = nn.Linear(in_channels * 4, hidden_size)
        self.txt_in = nn.Linear(context_dim, hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden_size, num_heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden_size, num_heads) for _ in range(depth_single_blocks))
        self.final = nn.Linear(hidden_size, in_channels * 4)

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,  # noqa: ANN001
                transformer_options={}, **kwargs):  # noqa: B006, ANN003, ANN201
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,  # noqa: ANN001
                 transformer_options={}, **kwargs) -> Tensor:  # noqa: B006, ANN003
        b, c, h, w = x.shape
        p = self.patch_size
        img = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        out = self.forward_orig(img, context, timestep, transformer_options=transformer_options,
                                attn_mask=kwargs.get("attention_mask"))
        return out.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def forward_orig(self, img: Tensor, txt: Tensor, timesteps: Tensor, transformer_options={},  # noqa: B006
                     attn_mask: Tensor | None = None) -> Tensor:
        transformer_options = transformer_options.copy()
        img = self.img_in(img)
        txt = self.txt_in(txt)
        vec = (1.0 - timesteps.to(img.dtype))[:, None, None]
        n = txt.shape[1] + img.shape[1]
        d = self.hidden_size // self.num_heads
        pos = torch.arange(n, dtype=torch.float32, device=img.device)[:, None]
        pe = pos * (1.0 / (100.0 ** (torch.arange(d // 2, device=img.device) / (d // 2))))[None, :]
        if BLOCK_INFO:
            transformer_options["total_blocks"] = len(self.double_blocks)
            transformer_options["block_type"] = "double"
        for i, block in enumerate(self.double_blocks):
            if BLOCK_INFO:
                transformer_options["block_index"] = i
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask,
                             transformer_options=transformer_options)
        img = torch.cat((txt, img), 1)
        if BLOCK_INFO:
            transformer_options["total_blocks"] = len(self.single_blocks)
            transformer_options["block_type"] = "single"
            if layers.IMG_SLICE:
                transformer_options["img_slice"] = [txt.shape[1], img.shape[1]]
        for i, block in enumerate(self.single_blocks):
            if BLOCK_INFO:
                transformer_options["block_index"] = i
            img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
        img = img[:, txt.shape[1]:, ...]
        return self.final(img)
