"""The `landmark` backend: exact softmax against every conditioning token plus an image-token budget.

Usable alone (approximate, not learned, always ready) and as the residual branch of the ttr hybrid
layer, which finds it through the session's backend registry by name and calls `branch(...)`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ...core.backend import Backend, Capabilities, capability_reasons
from ...core.call import AttentionCall
from ...core.masks import key_padding
from .attention import gather_landmarks, landmark_softmax
from .selection import image_budget, select_landmarks
from .settings import LandmarkSettings

_CACHE_SIZE = 64


class LandmarkBackend(Backend):
    """Landmark softmax attention. `branch` is the protocol the hybrid layer uses (fp32, differentiable)."""

    name = "landmark"
    capabilities = Capabilities(mask_kinds=("none", "key_padding"), learned=False, exact=False)

    def __init__(self, settings: LandmarkSettings | None = None) -> None:
        self.settings = settings or LandmarkSettings()
        self._idx_cache: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()

    def not_supported_reasons(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                              mask: torch.Tensor | None = None) -> list[str]:
        reasons = capability_reasons(self.capabilities, q, k, v, mask)
        if k.dim() == 4 and call.n_tokens > k.shape[2]:
            reasons.append(f"call declares {call.n_tokens} tokens but k has {k.shape[2]}")
        return reasons

    # ---- selection ------------------------------------------------------------------------------
    def count(self, n_keys: int, n_cond: int) -> int:
        """Landmarks for an unmasked call: all conditioning tokens plus the capped image budget."""
        n_cond = max(0, min(n_cond, n_keys))
        s = self.settings
        return n_cond + min(image_budget(n_keys - n_cond, s.fraction, s.min, s.max), n_keys - n_cond)

    def indices(self, k: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(idx, valid)` on k's device, see `select_landmarks`; cached per shape when there is no mask."""
        s = self.settings
        n_keys = k.shape[2]
        keep = key_padding(mask, 1, n_keys) if mask is not None else None
        if mask is not None and keep is None:
            raise ValueError("landmark: only key-padding masks are supported (the mask varies per query or head)")
        if keep is not None and bool(keep.all()):
            keep = None
        if keep is not None:
            if keep.shape[0] == 1 and k.shape[0] > 1:
                keep = keep.expand(k.shape[0], -1)
            idx, valid = select_landmarks(n_keys, call.n_cond_tokens, s.fraction, s.min, s.max, s.layout,
                                          call.latent_grid, keep)
            return idx.to(k.device), valid.to(k.device) if valid is not None else None
        key = (n_keys, call.n_cond_tokens, call.latent_grid, k.device, s.fraction, s.min, s.max, s.layout)
        idx = self._idx_cache.get(key)
        if idx is None:
            idx, _ = select_landmarks(n_keys, call.n_cond_tokens, s.fraction, s.min, s.max, s.layout,
                                      call.latent_grid)
            idx = idx.to(k.device)
            self._idx_cache[key] = idx
            if len(self._idx_cache) > _CACHE_SIZE:
                self._idx_cache.popitem(last=False)
        else:
            self._idx_cache.move_to_end(key)
        return idx, None

    # ---- attention --------------------------------------------------------------------------------
    def branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Landmark attention `[B, H, Nq, Dv]` in fp32 (differentiable; used by the hybrid layer)."""
        idx, valid = self.indices(k, call, mask)
        k_l = gather_landmarks(k, idx)
        v_l = gather_landmarks(v, idx)
        return landmark_softmax(q, k_l, v_l, valid, q.shape[-1] ** -0.5, self.settings.query_chunk)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.branch(q, k, v, call, mask).to(q.dtype)

    def memory_estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                        training: bool = False) -> int:
        """Working bytes beyond inputs and output: fp32 landmark K/V, logits and weights of one query
        chunk, the fp32 result before the cast (all logits when training: autograd keeps them)."""
        b, h, nq, d = q.shape
        dv = v.shape[-1]
        n_l = self.count(k.shape[2], call.n_cond_tokens)
        rows = nq if training else min(nq, self.settings.query_chunk)
        gathered = b * h * n_l * (d + dv) * 4
        logits = 2 * b * h * rows * n_l * 4
        q32 = b * h * rows * d * 4
        out32 = b * h * nq * dv * 4
        return int(gathered + logits + q32 + out32)
