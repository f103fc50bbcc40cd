"""Exact backends: `sdpa` (torch's scaled_dot_product_attention) and `host` (the host's own)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import Backend, Capabilities, HostAttention
from .call import AttentionCall
from .masks import to_sdpa_mask


class SdpaBackend(Backend):
    """torch SDPA: exact softmax attention; uses whatever torch backend is enabled (cuDNN, flash, ...)."""

    name = "sdpa"
    capabilities = Capabilities()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return sdpa(q, k, v, mask)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention `[B, H, N, D]` with an optional bool (True = attend) or additive mask."""
    m = to_sdpa_mask(mask, q.shape[0])
    if m is not None and m.dtype != torch.bool and m.dtype != q.dtype:
        m = m.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


class HostBackend(Backend):
    """The host's own attention, handed in per call by the adapter (ComfyUI's kernel, diffusers' dispatcher).

    Its `forward` needs the `host_attention` the session passes; without one it cannot serve.
    """

    name = "host"
    capabilities = Capabilities()

    def not_supported_reasons(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                              mask: torch.Tensor | None = None, host_attention: HostAttention | None = None) -> list[str]:
        return [] if host_attention is not None else ["the host did not hand in its attention function"]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None, host_attention: HostAttention | None = None) -> torch.Tensor:
        if host_attention is None:
            raise RuntimeError("backend 'host': the host did not hand in its attention function")
        return host_attention(q, k, v, mask)
