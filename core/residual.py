"""The contracts between a learned layer and the exact branch it keeps beside its learned part.

A hybrid layer (ttr) finds its exact branch by name in the session's backend registry; plugins never
import each other, both sides speak these Protocols, checked once when the name is resolved.

- `ResidualBranch`: exact softmax over a subset of keys (the landmarks, optionally a local window per
  query) that a hybrid layer blends with its learned output (`residual_problems` says what a candidate
  lacks).
- `ExactAttentionProvider`: the same exact set, with each row's log-sum-exp and the keys it covered, for a
  layer that puts the exact set and a learned far field under one normaliser (the joint layer).
- `ShardedResidualBranch`: the residual branch of a sequence-parallel call (`core.shard`).
The landmark plugin's `LandmarkBackend` implements all three.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from .call import AttentionCall


@runtime_checkable
class ResidualBranch(Protocol):
    """Exact softmax attention over a subset of keys (the landmarks, optionally a local window per query)."""

    #: the branch's settings (a pydantic model): recorded with the hybrid layer's checkpoints
    settings: Any
    #: the exact softmax's precision at inference: 'input' (the call's dtype) or 'fp8' (e4m3 products,
    #: core/exact_fp8.py), which a fused kernel computing this branch must follow
    precision: str

    def branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
               mask: torch.Tensor | None = None, query_index: torch.Tensor | None = None) -> torch.Tensor:
        """The branch's output `[B, H, Nq, Dv]`, fp32, differentiable. `query_index` (`[Nq]` long): the positions of
        q's rows when q is a subset of the queries (None: q covers the sequence)."""
        ...

    def indices(self, k: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(idx, valid)` on k's device: `idx [L]` landmark key positions shared by the batch with `valid` None, or
        per batch element `[B, L]` with a `[B, L]` bool `valid` (key padding). The same selection `branch` uses. A
        shared `idx` begins with every conditioning token of the call, key rows 0 … n−1 in order (the fused kernels
        load those rows without a gather)."""
        ...

    def window_plan(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall,
                    query_index: torch.Tensor | None = None) -> tuple[int, tuple[int, int] | None]:
        """`(radius, (h, w))` of the local window this call gets, `(0, None)` when it gets none — the one decision
        for both the branch and any fused kernel that computes it."""
        ...

    def count(self, n_keys: int, n_cond: int) -> int:
        """How many landmarks an unmasked call of `n_keys` keys (`n_cond` conditioning tokens first) gets."""
        ...

    def memory_estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                        training: bool = False) -> int:
        """Working bytes of one `branch` call beyond its inputs (its fp32 output included)."""
        ...


_MEMBERS = ("settings", "precision", "branch", "indices", "window_plan", "count", "memory_estimate")


def residual_problems(candidate: object) -> list[str]:
    """What `candidate` lacks to be a `ResidualBranch` (empty: nothing)."""
    return [f"no {name}" for name in _MEMBERS if not hasattr(candidate, name)]


class ExactKeys(NamedTuple):
    """Which keys a call's exact softmax covered, per query.

    Attributes:
        idx: `[L]` (shared by the batch) or `[B, L]` long key indices of the landmarks — every
            conditioning token first, then the image landmarks.
        valid: `[B, L]` bool (True = a real landmark) with per-batch sets, else None.
        win_idx: `[Nq, W]` long key indices of each query's local window, or None (no window for
            this call).
        win_ok: `[Bm, Nq, W]` bool (`Bm` 1 or B): True where a window entry counted — inside the grid,
            an image query, a key that is not a landmark and not padded. None with `win_idx`.
    """

    idx: torch.Tensor
    valid: torch.Tensor | None
    win_idx: torch.Tensor | None
    win_ok: torch.Tensor | None


class ExactAttention(NamedTuple):
    """An exact softmax over each query's exact set: `out [B, H, Nq, Dv]` and `lse [B, H, Nq]` (the
    log-sum-exp of the scaled logits over the set; −inf for a row with no key), both fp32 and
    differentiable, plus the key sets (`keys`)."""

    out: torch.Tensor
    lse: torch.Tensor
    keys: ExactKeys


@runtime_checkable
class ExactAttentionProvider(Protocol):
    """A backend that computes the exact part of a hybrid layer (the landmark backend does)."""

    def exact_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                        mask: torch.Tensor | None = None,
                        query_index: torch.Tensor | None = None) -> ExactAttention:
        """Exact softmax of queries `q [B, H, Nq, D]` over their exact sets within `k, v [B, H, Nk, D]`.

        :param mask: the host's mask (key padding), or None.
        :param query_index: `[Nq]` long key-sequence positions of q's rows; None when q is every query
            (`Nq == Nk`). The window needs them; without them the call uses the landmarks only.
        """
        ...


@runtime_checkable
class ShardedResidualBranch(Protocol):
    """A `ResidualBranch` that also serves sequence-parallel calls (`core.shard`): the same landmarks and window as
    the call on one process, with the rows it needs gathered from the other ranks."""

    def sharded_branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """`branch()` for this rank's queries: `q, k, v [B, H, n_local, D]` are this rank's rows (`call.shard` says
        which), the output `[B, H, n_local, Dv]` fp32 equals those rows of `branch()` on the whole sequence. A
        collective: every rank of the shard's group calls it for the same call."""
        ...

    def sharded_selection(self, call: AttentionCall,
                          device: torch.device) -> tuple[torch.Tensor, int, tuple[int, int] | None]:
        """`(idx [L], radius, grid)`: the landmark indices of the whole sequence (global token order, on `device`)
        and the local window's radius and latent grid (`0, None`: landmarks only) — the selection `sharded_branch`
        uses, for a fused kernel that gathers the same rows itself. No communication."""
        ...
