"""Tensor layouts at the ComfyUI boundary.

ComfyUI's attention kernels take q/k/v either as `[B, N, H*D]` (`skip_reshape=False`) or as
`[B, H, N, D]` (`skip_reshape=True`, what Flux sends) and return `[B, N, H*D]` unless
`skip_output_reshape=True`, which asks for `[B, H, N, D]`. attnplug works in `[B, H, N, D]`.
"""
from __future__ import annotations

import torch


def to_bhnd(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """A ComfyUI q/k/v in attnplug's `[B, H, N, D]` layout (a view when possible)."""
    if skip_reshape:
        if t.dim() != 4:
            raise ValueError(f"attnplug comfy override: skip_reshape=True expects [B, H, N, D], got {tuple(t.shape)}")
        return t
    if t.dim() != 3 or t.shape[-1] % heads:
        raise ValueError(f"attnplug comfy override: skip_reshape=False expects [B, N, H*D] with H={heads}, "
                         f"got {tuple(t.shape)}")
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def from_bhnd(out: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    """attnplug's `[B, H, N, D]` output in the layout ComfyUI asked for."""
    if skip_output_reshape:
        return out
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def as_bhnd_output(out: torch.Tensor, heads: int) -> torch.Tensor:
    """Normalize a kernel's output to `[B, H, N, D]`: some third-party overrides ignore
    `skip_output_reshape=True` and return `[B, N, H*D]` anyway."""
    if out.dim() == 4:
        return out
    if out.dim() == 3 and out.shape[-1] % heads == 0:
        b, n, hd = out.shape
        return out.view(b, n, heads, hd // heads).transpose(1, 2)
    raise ValueError(f"attnplug comfy override: the exact kernel returned shape {tuple(out.shape)}, "
                     f"expected [B, H, N, D] or [B, N, H*D] with H={heads}")
