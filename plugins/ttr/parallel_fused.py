"""The fused kernels on a sequence-parallel call (`core.shard`): `parallel.py`'s data flow with the Triton passes
doing each rank's local work.

```
rank r holds q, k, v of its tokens [B, H, n_r, D] (its text tokens first, then its image rows)
  key pass:   the ServePlan key launch over this rank's keys → one flat fp32 [S | z] buffer (replicated text: a
              key mask keeps the tokens rank 0 counts) ─► all_reduce (sum)
  landmarks:  the whole sequence's landmark rows ─► RowGather: one all-gather of [k | v]
  window r:   the whole grid rows within r rows of this rank's image rows ─► grid_band: one all-gather of every
              shard's edge rows
  query pass: the ServePlan query launches on a local sequence — [this rank's text | the band's image rows] as
              queries (the band's rows that are not this rank's: zeros, their output dropped), keys
              [text | band | landmark rows]; adaptive α against the call's mean of d: pass 1's sums of d over
              this rank's rows all-reduced before pass 2
```

The output equals the single-process layer's rows up to the order of the fp32 sums. A plan is built once per call
shape and shard (landmark rows, flags, launches) and cached on the layer like the single-process plans. A failed
launch raises: the ranks must take the same path (the collectives pair up), which a per-rank fallback would break.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...core.call import AttentionCall
from ...core.shard import RowGather, SequenceShard, all_reduce_sum, grid_band, grid_rows
from .layer import TtrLayer

if TYPE_CHECKING:
    from ...core.residual import ShardedResidualBranch
    from .kernels import ServePlan


class ShardedPlan:
    """The fused call of one layer on one rank at one shape: `plan(q, k, v, ...)` runs it (see the module docstring).

    :param q, k, v: this rank's tensors (shapes, dtype and device; their values are not read).
    :param residual: the landmark branch (its `sharded_selection`), or None: kernel-only.
    """

    def __init__(self, layer: TtrLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                 residual: "ShardedResidualBranch | None", eps: float) -> None:
        from .kernels import PhiWeights, ServePlan

        shard = call.shard
        assert shard is not None, "ShardedPlan needs call.shard"
        self.shard = shard
        bsz, heads, _, d = q.shape
        dev = q.device
        phi_q = PhiWeights.from_module(layer.phi_q, layer.activation, layer.l2_norm, eps)
        phi_k = PhiWeights.from_module(layer.phi_k, layer.activation, layer.l2_norm, eps) \
            if layer.phi_k is not None else phi_q
        keep = shard.counted_here(dev)
        self.keep = None if keep is None else keep.expand(bsz, -1).contiguous()
        self.keys: ServePlan = ServePlan(k, k, v, phi_k, phi_k, key_mask=self.keep is not None)

        idx, self.radius, grid = (None, 0, None) if residual is None else residual.sharded_selection(call, dev)
        self.gather = RowGather(idx, shard, dev) if idx is not None and idx.numel() else None
        n_lm = 0 if self.gather is None else int(idx.numel())  # type: ignore[union-attr]
        self.n_cond = shard.cond_sizes[shard.rank]
        lo, hi = shard.image_range()
        self.n_img = hi - lo
        flags = None
        if self.radius:
            assert grid is not None
            self.grid = grid
            row0, row1 = grid_rows(self.radius, grid[1], shard, grid[0])
            band = (row1 - row0) * grid[1]
            self.offset = lo - row0 * grid[1]  # where this rank's image rows start in the band
            n_v = self.n_cond + band
            flags = torch.zeros(n_v + n_lm, dtype=torch.int8, device=dev)  # 1: a landmark (the window skips it)
            if idx is not None:
                img = idx[idx >= shard.n_cond] - shard.n_cond - row0 * grid[1]
                flags[self.n_cond + img[(img >= 0) & (img < band)]] = 1
            local_grid: tuple[int, int] | None = (row1 - row0, grid[1])
        else:  # landmarks only: the queries are this rank's rows, the keys the landmark rows
            self.offset, n_v, local_grid = 0, self.n_cond + self.n_img, None
        self.n_v = n_v
        n_keys = (n_v if self.radius else 0) + n_lm
        proto_q = q.new_empty(bsz, heads, n_v, d)
        proto_k = q.new_empty(bsz, heads, max(n_keys, 1), d)
        lm_idx = torch.arange(n_keys - n_lm, n_keys, device=dev) if n_lm else None
        self.query_plan: ServePlan = ServePlan(
            proto_q, proto_k, proto_k, phi_q, phi_k, landmark_idx=lm_idx, alpha_logit=layer.alpha_logit.detach(),
            alpha_max=layer.alpha_max, gamma=layer.gamma, adaptive=layer.adaptive, eps=eps, window=self.radius,
            grid=local_grid, n_cond=self.n_cond, d_reference=layer.running_reference(), landmark_flags=flags,
            landmark_prefix=n_lm if n_keys == n_lm else 0)  # the landmark rows follow the window's rows, if any
        # the whole sequence's scale (it cancels in the ratio; the same as one process keeps the 16-bit dots alike)
        self.query_plan.s_scale = 1.0 / max(1, shard.n_tokens)
        counted = torch.ones(n_v, dtype=torch.bool, device=dev)  # the rows of d this rank adds into the mean
        if self.radius:
            counted[self.n_cond:] = False
            counted[self.n_cond + self.offset:self.n_cond + self.offset + self.n_img] = True
        if keep is not None:
            counted[:self.n_cond] = False
        self.counted = counted.float()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, branch_affine: torch.Tensor | None = None,
                 finite_flag: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, H, n_local, D]` in q's dtype: this rank's rows of the layer on the whole sequence. A collective."""
        shard, plan = self.shard, self.query_plan
        with torch.no_grad():
            sz, z = self.keys.key_state(k, v, self.keep)
            all_reduce_sum(sz, shard)  # S and z of the whole sequence, one buffer
            s_q = plan.scaled_state(sz, q.dtype)
            keys = self._keys(k, v)
            dk = k.shape[-1]
            q_v = self._queries(q)
            mean = None if plan.modes != (2, 3) else self._mean_of_d
            out = plan.query(q_v, keys[..., :dk], keys[..., dk:], s_q, z, branch_affine, finite_flag, mean)
            return out if not self.radius else self._own_rows(out)

    # ---- the local sequence ----------------------------------------------------------------------------------
    def _keys(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`[B, H, n_keys, Dk + Dv]`: [text | band | landmark rows] with a window, else the landmark rows."""
        kv = torch.cat([k, v.to(k.dtype)], dim=-1)
        parts = []
        if self.radius:
            parts += [kv[:, :, :self.n_cond], grid_band(kv[:, :, self.n_cond:], self.radius, self.grid, self.shard)]
        if self.gather is not None:
            parts.append(self.gather(kv))
        if not parts:  # kernel-only: the query passes read no key
            return kv[:, :, :1]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _queries(self, q: torch.Tensor) -> torch.Tensor:
        """q laid out as the local sequence: this rank's rows, the band's other rows zero."""
        if not self.radius:
            return q
        q_v = q.new_zeros(*q.shape[:2], self.n_v, q.shape[-1])
        q_v[:, :, :self.n_cond] = q[:, :, :self.n_cond]
        start = self.n_cond + self.offset
        q_v[:, :, start:start + self.n_img] = q[:, :, self.n_cond:]
        return q_v

    def _own_rows(self, out: torch.Tensor) -> torch.Tensor:
        start = self.n_cond + self.offset
        return torch.cat([out[:, :, :self.n_cond], out[:, :, start:start + self.n_img]], dim=2)

    def _mean_of_d(self, d: torch.Tensor, d_sum: torch.Tensor) -> None:
        """Pass 1's sums of d replaced by the whole call's mean times the local length (pass 2 divides by it)."""
        local = (d * self.counted).sum(dim=-1).reshape(-1)  # [B·H]
        all_reduce_sum(local, self.shard)
        d_sum.copy_(local * (self.n_v / self.shard.n_tokens))


def shard_layout(shard: SequenceShard) -> tuple[object, ...]:
    """What a sharded plan depends on beyond the tensors' shapes: the shard's split."""
    return ("sharded", shard.rank, shard.world, shard.cond_sizes, shard.image_sizes, shard.cond_replicated)
