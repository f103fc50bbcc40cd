"""A hybrid ttr layer on a sequence-parallel call (`core.shard`): this rank's rows of the single-process layer.

```
rank r holds q, k, v of its tokens [B, H, n_r, D] (its conditioning tokens first, then its image rows)
  key pass:   S_r = Σ φ(k) vᵀ, z_r = Σ φ(k) over the keys this rank counts        (local, fp32)
              [S | z] all-reduced (sum): one [B, H, F, Dv + 1] fp32 buffer — 24·128·129·4 B ≈ 1.6 MB per
              FLUX layer at F = 128, whatever the resolution
  query pass: out_k = φ(q)·S / (φ(q)·z + ε) for this rank's queries                 (local)
  landmarks:  the residual's `sharded_branch` — the whole sequence's landmark rows all-gathered by global
              index, the window's halo rows from the neighbouring shards (plugins/landmark/sharded.py)
  blend:      α from d against the running reference (no communication), or against the call's mean of d
              (`alpha_reference = "call"`: one all-reduce of [Σd, count] per (b, h))
```

Nothing here runs for a call without a shard. The output equals the single-process layer's rows up to the order
of the fp32 sums (one all-reduce instead of one loop over key chunks). Inference only (no autograd): distillation
runs data-parallel instead (`distill_parallel.py`).
"""
from __future__ import annotations

from typing import Callable

import torch

from ...core.call import AttentionCall
from ...core.residual import ShardedResidualBranch
from ...core.shard import SequenceShard, all_reduce_sum
from .kernel_regression import key_state, queries
from .layer import TtrLayer


def reduced_state(layer: TtrLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shard: SequenceShard,
                  key_chunk: int, eps: float, feature_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """S and z of the whole sequence: this rank's partial sums, all-reduced in one buffer."""
    s, z = key_state(k, v, lambda x: layer.phi(x, "k", feature_dtype, eps), q,
                     lambda x: layer.phi(x, "q", feature_dtype, eps), _counted(shard, k), key_chunk)
    packed = torch.cat([s, z.unsqueeze(-1)], dim=-1)
    all_reduce_sum(packed, shard)
    return packed[..., :-1], packed[..., -1]


def _counted(shard: SequenceShard, x: torch.Tensor) -> torch.Tensor | None:
    """`[B, n_local]` key padding that leaves out the tokens another rank counts (replicated text), or None."""
    keep = shard.counted_here(x.device)
    return None if keep is None else keep.expand(x.shape[0], -1)


def call_mean(shard: SequenceShard) -> Callable[[torch.Tensor], torch.Tensor]:
    """The mean of d `[B, H, n_local]` over every query of the call, `[B, H, 1]` (one all-reduce)."""

    def mean(d: torch.Tensor) -> torch.Tensor:
        keep = shard.counted_here(d.device)
        w = torch.ones(d.shape[-1], device=d.device, dtype=d.dtype) if keep is None else keep.to(d.dtype)
        sums = torch.stack([(d * w).sum(dim=-1), w.sum().expand(d.shape[:2])], dim=-1)  # [B, H, 2]
        all_reduce_sum(sums, shard)
        return (sums[..., :1] / sums[..., 1:].clamp_min(1.0))

    return mean


def sharded_forward(layer: TtrLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                    residual: ShardedResidualBranch | None, key_chunk: int = 1024, query_chunk: int = 1024,
                    eps: float = 1e-6, feature_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[B, H, n_local, Dv]` fp32: this rank's rows of `layer(q, k, v, call)` on the whole sequence (no mask,
    no autograd). A collective: every rank of `call.shard` calls it for the same call."""
    shard = call.shard
    assert shard is not None, "sharded_forward needs call.shard"
    with torch.no_grad():
        s, z = reduced_state(layer, q, k, v, shard, key_chunk, eps, feature_dtype)
        out_k, den = queries(q, s, z, lambda x: layer.phi(x, "q", feature_dtype, eps), eps, query_chunk)
        branch = None if residual is None else (lambda: residual.sharded_branch(q, k, v, call))
        return layer.combine(out_k, den, call, branch, call_mean=call_mean(shard))
