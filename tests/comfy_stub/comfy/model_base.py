"""Stand-in of `comfy/model_base.py` → `BaseModel.apply_model` / `_apply_model` for Flux.

As upstream: `_apply_model` copies `transformer_options`, adds `prefetch_dynamic_vbars`, and calls
`diffusion_model(x, t, context=..., transformer_options=...)`. Flow-matching (CONST) prediction:
the sampler gets `denoised = x - sigma * model_output`.
"""
from __future__ import annotations

import torch
from torch import nn

from comfy.ldm.flux.model import Flux


class BaseModel(nn.Module):
    def __init__(self, diffusion_model: Flux | None = None) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model or Flux()
        self.current_patcher = None

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_crossattn: torch.Tensor,
                    transformer_options: dict = {}) -> torch.Tensor:  # noqa: B006
        transformer_options = transformer_options.copy()
        transformer_options["prefetch_dynamic_vbars"] = False
        out = self.diffusion_model(x, t, context=c_crossattn, transformer_options=transformer_options)
        return x - t[:, None, None, None] * out
