"""What a host tells the session about the prompt: a pooled embedding of the conditioning, per run.

A routing policy may decide by the prompt (some prompts tolerate approximation less). Hosts offer the
pooled text embedding they already have — Flux's CLIP `pooled_projections` in diffusers, `y` (or the mean
of the context tokens) in ComfyUI, the testbed's pooled prompt vector — through `Session.offer_text`, at most
once per transformer forward. Offering only keeps a reference (no copy, no device sync); whoever reads it
(the policy gate, once per step) pools and moves it.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class TextSource(Protocol):
    """Anything that can hand over the current pooled conditioning embedding (`[B, D]` or `[D]`), or None."""

    @property
    def text_embedding(self) -> torch.Tensor | None: ...


def cond_rows(embedding: torch.Tensor, cond_or_uncond: Sequence[int] | None) -> torch.Tensor:
    """The rows of a batched embedding `[B, D]` that belong to the conditional pass.

    ComfyUI batches chunks of conditional (0) and unconditional (1) rows together; `cond_or_uncond` names
    each chunk. Without it, or when it does not divide the batch, every row is kept."""
    if not cond_or_uncond or embedding.dim() < 2 or embedding.shape[0] % len(cond_or_uncond):
        return embedding
    chunks = embedding.chunk(len(cond_or_uncond))
    kept = [c for c, kind in zip(chunks, cond_or_uncond) if kind == 0]
    return torch.cat(kept) if kept else embedding


def pool_text(embedding: torch.Tensor) -> torch.Tensor:
    """One vector `[D]` (float32, on the embedding's device) from `[D]`, `[B, D]` or token embeddings `[B, T, D]`:
    the mean over batch (and tokens). A run's routing is shared by its whole batch, so the batch is pooled."""
    x = embedding.detach().float()
    while x.dim() > 1:
        x = x.mean(0)
    return x
