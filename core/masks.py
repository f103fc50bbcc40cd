"""Attention masks at the host boundary: classify them and reduce them to key padding.

Backends declare which mask kinds they serve (`"none"`, `"key_padding"`, `"full"`). A key-padding
mask is a bool tensor `[B, Nk]`, True where the key may be attended.
"""
from __future__ import annotations

from typing import Literal

import torch

MaskKind = Literal["none", "key_padding", "full"]


def mask_kind(mask: torch.Tensor | None, n_queries: int, n_keys: int) -> MaskKind:
    """Classify a host mask: none, key padding (same for every query and head) or full."""
    if mask is None:
        return "none"
    return "key_padding" if key_padding(mask, n_queries, n_keys) is not None else "full"


def key_padding(mask: torch.Tensor | None, n_queries: int, n_keys: int) -> torch.Tensor | None:
    """Reduce a mask to `[B, Nk]` bool (True = attend) when it is one; None when it is not.

    Accepts bool masks (True = attend) and additive float masks (0 = attend, -inf/very negative =
    blocked) shaped `[B, Nk]`, `[B, 1, Nk]`, `[B, 1, 1, Nk]` or `[B, H|1, Nq|1, Nk]` whose rows
    are identical across heads and queries.
    """
    if mask is None:
        return None
    if mask.shape[-1] != n_keys:
        raise ValueError(f"attention mask: last dim must be the key count {n_keys}, got shape {tuple(mask.shape)}")
    keep = mask if mask.dtype == torch.bool else mask > -1e4
    if keep.dim() == 2:
        return keep
    if keep.dim() == 3:
        keep = keep.unsqueeze(1)
    if keep.dim() != 4:
        raise ValueError(f"attention mask: expected 2-D to 4-D, got shape {tuple(mask.shape)}")
    first = keep[:, :1, :1, :]
    if (keep == first).all():
        return first[:, 0, 0, :]
    return None


def served_key_padding(keep: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A `key_padding` result as a backend serves it: None when it masks no key (nothing to do),
    else `[batch, Nk]` (a `[1, Nk]` mask broadcast over the batch)."""
    if keep is None or bool(keep.all()):
        return None
    return keep.expand(batch, -1) if keep.shape[0] == 1 and batch > 1 else keep


def to_sdpa_mask(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Broadcastable 4-D mask for `scaled_dot_product_attention` (bool stays bool, float stays additive)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        if mask.shape[0] == batch:
            return mask[:, None, None, :]
        return mask[None, None, :, :]
    if mask.dim() == 3:
        return mask[:, None, :, :]
    return mask
