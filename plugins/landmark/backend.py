"""The `landmark` backend: exact softmax against every conditioning token plus an image-token budget,
optionally joined by a local 2-D window of image keys around each image query (`window = r`).

Usable alone (approximate, not learned, always ready) and as the residual branch of the ttr hybrid
layer, which finds it through the session's backend registry by name: it implements the core's `ResidualBranch`
contract (`branch`, `indices`, `window_plan`, `count`, `memory_estimate`, `settings`) and, for the ttr joint
layer, `ExactAttentionProvider` (`exact_attention`: the same softmax plus each row's log-sum-exp and the key sets).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch

from ...core.backend import Backend, Capabilities, capability_reasons
from ...core.call import AttentionCall
from ...core.exact_fp8 import value_scale
from ...core.masks import key_padding, served_key_padding
from ...core.residual import ExactAttention, ExactKeys
from ...core.shard import shard_reasons
from .attention import gather_landmarks, landmark_softmax, landmark_window_softmax, window_table
from .selection import image_budget, select_landmarks
from .sharded import sharded_branch, sharded_selection
from .settings import LandmarkSettings

_CACHE_SIZE = 64
log = logging.getLogger("attnplug")


class LandmarkBackend(Backend):
    """Landmark softmax attention. `branch` is the protocol the hybrid layer uses (fp32, differentiable).

    With `settings.window = r > 0` every image query also sees the image keys within Chebyshev
    radius r of its own grid position (one joint softmax, each key counted once); conditioning
    queries see the landmarks only. Calls without a usable latent grid, or whose queries are a
    subset of the sequence with unknown positions, use the landmarks only (warned once per reason).
    """

    name = "landmark"
    capabilities = Capabilities(mask_kinds=("none", "key_padding"), learned=False, exact=False,
                                sequence_parallel=True)

    def __init__(self, settings: LandmarkSettings | None = None) -> None:
        self.settings = settings or LandmarkSettings()
        # per call shape (no mask): the landmark indices, and the whole sequence's window rows (`_window_rows`)
        self._idx_cache: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
        self._rows_cache: OrderedDict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._window_cache: OrderedDict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._warned: set[str] = set()  # window fallback reasons already logged by this instance

    def not_supported_reasons(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                              mask: torch.Tensor | None = None) -> list[str]:
        reasons = capability_reasons(self.capabilities, q, k, v, mask)
        if k.dim() == 4 and call.n_tokens > k.shape[2]:
            reasons.append(f"call declares {call.n_tokens} tokens but k has {k.shape[2]}")
        reasons += shard_reasons(call, q, mask)
        return reasons

    # ---- selection ------------------------------------------------------------------------------
    def count(self, n_keys: int, n_cond: int) -> int:
        """Landmarks for an unmasked call: all conditioning tokens plus the capped image budget."""
        n_cond = max(0, min(n_cond, n_keys))
        s = self.settings
        return n_cond + min(image_budget(n_keys - n_cond, s.fraction, s.min, s.max), n_keys - n_cond)

    @staticmethod
    def key_mask(k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The host mask as `[B, Nk]` key padding (True = valid), or None when no key is masked.

        Raises ValueError for masks that vary per query or head (not supported here)."""
        if mask is None:
            return None
        keep = key_padding(mask, 1, k.shape[2])
        if keep is None:
            raise ValueError("landmark: only key-padding masks are supported (the mask varies per query or head)")
        return served_key_padding(keep, k.shape[0])

    def indices(self, k: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(idx, valid)` on k's device, see `select_landmarks`; cached per shape when there is no mask."""
        return self._indices(k, call, self.key_mask(k, mask))

    def _indices(self, k: torch.Tensor, call: AttentionCall,
                 keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`indices` for a mask already reduced by `key_mask`."""
        s = self.settings
        n_keys = k.shape[2]
        if keep is not None:
            idx, valid = select_landmarks(n_keys, call.n_cond_tokens, s.fraction, s.min, s.max, s.layout,
                                          call.latent_grid, keep)
            return idx.to(k.device), valid.to(k.device) if valid is not None else None
        return self.shared_indices(n_keys, call, k.device), None

    def shared_indices(self, n_keys: int, call: AttentionCall, device: torch.device) -> torch.Tensor:
        """`[L]` landmark key positions of an unmasked call of `n_keys` keys (`call.n_cond_tokens` first), on
        `device`; cached per shape."""
        s = self.settings
        key = self._shape_key(n_keys, call, device)
        idx = _cached(self._idx_cache, key)
        if idx is None:
            idx, _ = select_landmarks(n_keys, call.n_cond_tokens, s.fraction, s.min, s.max, s.layout,
                                      call.latent_grid)
            idx = _store(self._idx_cache, key, idx.to(device))
        return idx

    def _shape_key(self, n_keys: int, call: AttentionCall, device: torch.device) -> tuple[object, ...]:
        """What an unmasked call's landmarks and window depend on (the settings are read at every call)."""
        s = self.settings
        return (n_keys, call.n_cond_tokens, call.latent_grid, device, s.fraction, s.min, s.max, s.layout, s.window)

    # ---- local window ------------------------------------------------------------------------------
    def window_table(self, grid: tuple[int, int], n_cond: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(idx, valid)` `[h*w, (2r+1)²]` on `device`: each image token's window as key-sequence
        indices (conditioning tokens first) and its in-grid mask; cached per (grid, r, n_cond, device)."""
        r = self.settings.window
        key = (grid, r, n_cond, device)
        hit = _cached(self._window_cache, key)
        if hit is None:
            idx, valid = window_table(grid, r)
            hit = _store(self._window_cache, key, ((idx + n_cond).to(device), valid.to(device)))
        return hit

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("attnplug: landmark: %s", message)

    def window_plan(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall,
                    query_index: torch.Tensor | None = None) -> tuple[int, tuple[int, int] | None]:
        """Whether this call gets the window: `(radius, grid)`, `(0, None)` when it does not.

        It does not when the window is off or there is no image query, and when the window cannot apply
        (no grid, a grid that does not hold the image tokens, a query subset without positions): the call
        then uses the landmarks only, warned once per reason and backend instance. The one decision (and
        warning) for both paths: `branch()` here and the ttr fused kernels, which serve the window only
        where this says so."""
        r = self.settings.window
        n_keys = k.shape[2]
        n_img = n_keys - call.cond_in(n_keys)
        grid = call.latent_grid
        if r == 0 or n_img == 0:
            return 0, None
        if grid is None:
            s = self.settings
            self._warn_once("no-grid", f"window = {r} needs the latent grid, but {call.layer_key}'s call has none "
                                       f"(host did not report it); such calls use the landmarks only ({s.fraction:g} "
                                       f"of the image tokens, at least {s.min}; where the host never reports a "
                                       "grid, window = 0 with fraction = 0.08, min = 64 is the measured "
                                       "landmarks-only setting, docs/QUALITY.md)")
        elif grid[0] * grid[1] != n_img:
            self._warn_once("grid-mismatch", f"window = {r}: {call.layer_key} has {n_img} image tokens but its "
                                             f"latent grid {tuple(grid)} holds {grid[0] * grid[1]}; such calls "
                                             "use the landmarks only")
        elif query_index is None and q.shape[2] != n_keys:
            self._warn_once("query-subset", f"window = {r} needs each query's grid position, but "
                                            f"{call.layer_key} got {q.shape[2]} queries for {n_keys} keys and no "
                                            "query_index (a caller that subsamples queries must pass their "
                                            "positions, as the ttr distiller does); such calls use the "
                                            "landmarks only, so they differ from full-sequence calls")
        else:
            return r, (int(grid[0]), int(grid[1]))
        return 0, None

    def _window_rows(self, positions: torch.Tensor, k: torch.Tensor, call: AttentionCall, idx: torch.Tensor,
                     valid: torch.Tensor | None, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(win_idx [n, W], win_ok [Bm, n, W])` for queries at key-sequence `positions [n]`.

        An entry counts when it is inside the grid, the query is an image token, the key is not
        already a landmark (of that batch element) and not padded."""
        n_cond = call.cond_in(k.shape[2])
        assert call.latent_grid is not None
        table, inside = self.window_table(call.latent_grid, n_cond, k.device)
        is_img = positions >= n_cond
        rows = (positions - n_cond).clamp_min(0)
        win_idx = table.index_select(0, rows)
        ok = inside.index_select(0, rows) & is_img[:, None]
        if idx.dim() == 1:
            is_lm = torch.zeros(1, k.shape[2], dtype=torch.bool, device=k.device)
            is_lm[0, idx] = True
        else:  # per-batch landmark sets, padded with index 0 / valid False: count, never overwrite
            assert valid is not None
            is_lm = torch.zeros(idx.shape[0], k.shape[2], dtype=torch.int32, device=k.device)
            is_lm = is_lm.scatter_add_(1, idx, valid.to(torch.int32)) > 0
        allowed = ~is_lm if keep is None else keep.to(k.device) & ~is_lm
        return win_idx, ok[None] & allowed[:, win_idx]

    # ---- attention --------------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """The exact softmax's precision at inference (`ResidualBranch.precision`): 'input' or 'fp8'."""
        return self.settings.precision

    def fp8_value_scale(self, v: torch.Tensor) -> torch.Tensor | None:
        """The values' per-channel e4m3 scale over every key where this call rounds to FP8 (`precision = "fp8"`,
        no gradients wanted), else None."""
        if self.settings.precision != "fp8" or torch.is_grad_enabled():
            return None
        return value_scale(v)

    def branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
               mask: torch.Tensor | None = None, query_index: torch.Tensor | None = None) -> torch.Tensor:
        """Landmark attention `[B, H, Nq, Dv]` in fp32 (differentiable; used by the hybrid layer).

        :param query_index: `[Nq]` long key-sequence positions of q's rows, needed by the window when
            the queries are a subset of the sequence; None means q covers the sequence (`Nq == Nk`).
            Ignored when `window = 0`.
        """
        keep, idx, valid, k_l, v_l = self._landmark_set(k, v, call, mask)
        scale = q.shape[-1] ** -0.5
        chunk = self.settings.query_chunk
        vs = self.fp8_value_scale(v)
        if self.window_plan(q, k, call, query_index)[0] == 0:
            return landmark_softmax(q, k_l, v_l, valid, scale, chunk, v_scale=vs)
        if query_index is not None:
            positions = self._positions(q, k, query_index)
            win_idx, win_ok = self._window_rows(positions, k, call, idx, valid, keep)
            return landmark_window_softmax(q, k, v, k_l, v_l, valid, win_idx, win_ok, scale, chunk, v_scale=vs)
        # the whole sequence: conditioning rows see the landmarks only, image rows get their window
        n_cond = call.cond_in(k.shape[2])
        rows_key = self._shape_key(k.shape[2], call, k.device) if keep is None else None
        rows = None if rows_key is None else _cached(self._rows_cache, rows_key)
        if rows is None:
            positions = torch.arange(n_cond, k.shape[2], device=k.device)
            rows = self._window_rows(positions, k, call, idx, valid, keep)
            if rows_key is not None:  # unmasked: the same rows for every call of this shape
                _store(self._rows_cache, rows_key, rows)
        win_idx, win_ok = rows
        out_img = landmark_window_softmax(q[:, :, n_cond:], k, v, k_l, v_l, valid, win_idx, win_ok, scale, chunk,
                                          v_scale=vs)
        if n_cond == 0:
            return out_img
        return torch.cat([landmark_softmax(q[:, :, :n_cond], k_l, v_l, valid, scale, chunk, v_scale=vs), out_img],
                         dim=2)

    def exact_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                        mask: torch.Tensor | None = None, query_index: torch.Tensor | None = None) -> ExactAttention:
        """`branch()` with each row's log-sum-exp and the key sets it covered (`core.residual`): what a layer
        needs that puts this exact set and a learned far field under one normaliser, and leaves these keys
        out of the far field. Same softmax and the same window decision as `branch()` (its output equals
        `branch()`'s for the same queries)."""
        keep, idx, valid, k_l, v_l = self._landmark_set(k, v, call, mask)
        scale = q.shape[-1] ** -0.5
        chunk = self.settings.query_chunk
        vs = self.fp8_value_scale(v)
        if self.window_plan(q, k, call, query_index)[0] == 0:
            out, lse = landmark_softmax(q, k_l, v_l, valid, scale, chunk, return_lse=True, v_scale=vs)
            return ExactAttention(out, lse, ExactKeys(idx, valid, None, None))
        positions = self._positions(q, k, query_index) if query_index is not None \
            else torch.arange(k.shape[2], device=k.device)
        # conditioning queries get no window entry (`_window_rows`): their rows are the landmark softmax
        win_idx, win_ok = self._window_rows(positions, k, call, idx, valid, keep)
        out, lse = landmark_window_softmax(q, k, v, k_l, v_l, valid, win_idx, win_ok, scale, chunk, return_lse=True,
                                           v_scale=vs)
        return ExactAttention(out, lse, ExactKeys(idx, valid, win_idx, win_ok))

    def _landmark_set(self, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, mask: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The key mask (reduced once: the landmarks and the window both use it), the landmark indices and their
        validity, and the landmarks' keys and values: what `branch()` and `exact_attention()` both start from."""
        keep = self.key_mask(k, mask)
        idx, valid = self._indices(k, call, keep)
        return keep, idx, valid, gather_landmarks(k, idx), gather_landmarks(v, idx)

    @staticmethod
    def _positions(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
        """`query_index` checked (`[Nq]` integers in `[0, Nk)`) and on k's device as long."""
        if query_index.dim() != 1 or query_index.shape[0] != q.shape[2] or query_index.is_floating_point():
            raise ValueError(f"landmark: query_index must be [{q.shape[2]}] integer positions, "
                             f"got {tuple(query_index.shape)} {query_index.dtype}")
        positions = query_index.to(device=k.device, dtype=torch.long)
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= k.shape[2]):
            raise ValueError(f"landmark: query_index must lie in [0, {k.shape[2]}), got "
                             f"[{int(positions.min())}, {int(positions.max())}]")
        return positions

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if call.shard is not None:
            return self.sharded_branch(q, k, v, call).to(q.dtype)
        return self.branch(q, k, v, call, mask).to(q.dtype)

    # ---- sequence parallelism (core.shard) -----------------------------------------------------------
    def sharded_branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """This rank's rows of `branch()` on the whole sequence (`core.residual.ShardedResidualBranch`; no mask).
        A collective: every rank of `call.shard` calls it (`sharded.py` has the data flow)."""
        return sharded_branch(self, q, k, v, call)

    def sharded_selection(self, call: AttentionCall,
                          device: torch.device) -> tuple[torch.Tensor, int, tuple[int, int] | None]:
        """The whole sequence's landmarks and window of a sequence-parallel call: `(idx [L], radius, grid)`
        (`core.residual.ShardedResidualBranch`)."""
        return sharded_selection(self, call, device)

    def rows_cache_get(self, key: tuple[object, ...]) -> Any:
        """A cached window table (`sharded.py`), or None."""
        return _cached(self._rows_cache, key)

    def rows_cache_put(self, key: tuple[object, ...], value: Any) -> Any:
        return _store(self._rows_cache, key, value)

    def memory_estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                        training: bool = False) -> int:
        """Working bytes beyond inputs and output: fp32 landmark K/V, logits and weights of one query
        chunk, the fp32 result before the cast (all logits when training: autograd keeps them). With a
        window: the gathered fp32 window K/V and window logits of one chunk (of every query when
        training) and the `[Nq, W]` index tables."""
        b, h, nq, d = q.shape
        dv = v.shape[-1]
        n_l = self.count(k.shape[2], call.n_cond_tokens)
        rows = nq if training else min(nq, self.settings.query_chunk)
        gathered = b * h * n_l * (d + dv) * 4
        logits = 2 * b * h * rows * n_l * 4
        q32 = b * h * rows * d * 4
        out32 = b * h * nq * dv * 4
        window = 0
        if self.settings.window:
            n_win = (2 * self.settings.window + 1) ** 2
            window = b * h * rows * n_win * (d + dv + 2) * 4 + nq * n_win * (8 + 1 + b)
        return int(gathered + logits + q32 + out32 + window)


def _cached(cache: "OrderedDict[tuple[object, ...], Any]", key: tuple[object, ...]) -> Any:
    """The entry at `key` (now the most recently used), or None."""
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
    return hit


def _store(cache: "OrderedDict[tuple[object, ...], Any]", key: tuple[object, ...], value: Any) -> Any:
    """Put `value` at `key`, dropping the least recently used entry beyond `_CACHE_SIZE`; returns `value`."""
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value
