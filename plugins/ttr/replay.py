"""Replay memory of the online distiller: per-layer queues under ONE global byte budget.

A sample is what one training call saw: the query subset, the FULL keys and values (never
subsampled: a student trained on subsampled K/V learns another attention), the teacher output of
the query subset, the key-padding mask and the call record. Samples are stored cloned, in a storage
dtype (fp16 by default) and on the CPU by default: full K/V make samples large (about 56 MB per
Flux layer at 1024²), and GPU-resident replay grows VRAM until the sampler dies.

Budget: pushing a sample first trims the layer's queue to `per_layer - 1`, then evicts globally
oldest samples (a global sequence number; each queue is FIFO, so the oldest sample is at the head
of some queue) until the new sample fits. A sample larger than the whole budget is not stored.
`bytes_used` never exceeds `max_bytes`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ...core.call import AttentionCall
from ...core.checkpoint import MetaReader

_FP16_MAX = 65000.0


@dataclass
class ReplaySample:
    """One stored training example of one layer."""

    layer_key: str
    q: torch.Tensor  # [B, H, nq, D] query subset
    k: torch.Tensor  # [B, H, Nk, D] full keys
    v: torch.Tensor  # [B, H, Nk, Dv] full values
    teacher: torch.Tensor  # [B, H, nq, Dv] exact output of the query subset
    mask: torch.Tensor | None  # [B, Nk] bool key padding (True = attend) or None
    call: AttentionCall
    query_index: torch.Tensor | None = None  # [nq] long positions of the query subset (None: every query)
    seq: int = 0  # global push order (eviction key)
    live: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # fp32 device copy during its call

    @property
    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v, self.teacher))
        if self.query_index is not None:
            total += self.query_index.numel() * self.query_index.element_size()
        if self.mask is not None:
            total += self.mask.numel() * self.mask.element_size()
        return total

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """fp32 tensors on `device` for a training update (the live copy when there is one)."""
        if self.live is not None:
            return {**self.live, "query_index": self._query_index(device)}  # type: ignore[dict-item]
        with torch.inference_mode(False):  # never hand inference tensors to autograd
            out: dict[str, torch.Tensor | None] = {
                name: getattr(self, name).to(device=device, dtype=torch.float32, copy=True)
                for name in ("q", "k", "v", "teacher")
            }
            out["mask"] = None if self.mask is None else self.mask.to(device, copy=True)
        out["query_index"] = self._query_index(device)
        return out

    def _query_index(self, device: torch.device) -> torch.Tensor | None:
        return None if self.query_index is None else self.query_index.to(device)


def to_storage(
    t: torch.Tensor, dtype: torch.dtype, device: torch.device | str, absmax: float | None = None
) -> torch.Tensor:
    """A detached, cloned, non-inference copy for storage. fp16 values beyond its range go to bf16
    instead of becoming inf (`absmax`, when the caller knows it, saves a device sync)."""
    with torch.inference_mode(False):
        target = dtype
        if dtype == torch.float16 and t.is_floating_point() and t.numel():
            if absmax is None:
                absmax = float(t.detach().abs().max())
            if absmax > _FP16_MAX:
                target = torch.bfloat16
        return t.detach().to(device=device, dtype=target if t.is_floating_point() else t.dtype, copy=True)


def storage_copies(
    tensors: dict[str, torch.Tensor | None], dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor | None]:
    """`to_storage` of several tensors with one device sync for the fp16 range check."""
    names = [n for n, t in tensors.items() if t is not None and t.is_floating_point() and t.numel()]
    maxes: dict[str, float] = {}
    if dtype == torch.float16 and names:
        with torch.inference_mode(False):
            maxes = dict(
                zip(
                    names,
                    torch.stack(
                        [
                            tensors[n].detach().abs().amax().float()  # type: ignore[union-attr]
                            for n in names
                        ]
                    ).tolist(),
                )
            )
    return {
        n: None if t is None else to_storage(t, dtype, device, maxes.get(n, 0.0)) for n, t in tensors.items()
    }


@dataclass
class ReplayCounters:
    """Monotonic counters, saved with the distiller state."""

    next_seq: int = 0
    pushed: int = 0
    evicted_budget: int = 0
    evicted_per_layer: int = 0
    rejected_too_large: int = 0
    cleared: int = 0

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplayCounters:
        """Strict (checkpoint input): non-negative integers; raises `CheckpointError` naming the counter."""
        m = MetaReader(data, "replay.counters")
        return cls(**{k: m.get_int(k, lo=0) for k in data if k in cls.__dataclass_fields__})


class ReplayBuffer:
    """Per-layer FIFO queues with a per-layer length cap and one global byte budget."""

    def __init__(self, max_bytes: int, per_layer: int) -> None:
        if max_bytes <= 0 or per_layer <= 0:
            raise ValueError(f"ReplayBuffer: max_bytes ({max_bytes}) and per_layer ({per_layer}) must be > 0")
        self.max_bytes = int(max_bytes)
        self.per_layer = int(per_layer)
        self.queues: dict[str, deque[ReplaySample]] = {}
        self.bytes_used = 0
        self.peak_bytes = 0
        self.counters = ReplayCounters()

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def layer(self, layer_key: str) -> list[ReplaySample]:
        return list(self.queues.get(layer_key, ()))

    def push(self, sample: ReplaySample) -> bool:
        """Store `sample` (assigning its sequence number); evict as needed. False when it is larger
        than the whole budget (then it is not stored, but may still be trained on)."""
        sample.seq = self.counters.next_seq
        self.counters.next_seq += 1
        size = sample.nbytes
        if size > self.max_bytes:
            self.counters.rejected_too_large += 1
            return False
        queue = self.queues.setdefault(sample.layer_key, deque())
        while len(queue) >= self.per_layer:
            self._drop(queue.popleft())
            self.counters.evicted_per_layer += 1
        while self.bytes_used + size > self.max_bytes:
            self._evict_oldest()
        queue.append(sample)
        self.bytes_used += size
        self.peak_bytes = max(self.peak_bytes, self.bytes_used)
        self.counters.pushed += 1
        return True

    def _evict_oldest(self) -> None:
        heads = [(q[0].seq, key) for key, q in self.queues.items() if q]
        if not heads:  # cannot happen while bytes_used > 0; guards an accounting error
            raise RuntimeError(f"replay: {self.bytes_used} bytes accounted but no sample stored")
        _, key = min(heads)
        self._drop(self.queues[key].popleft())
        self.counters.evicted_budget += 1

    def _drop(self, sample: ReplaySample) -> None:
        self.bytes_used -= sample.nbytes
        sample.live = None

    def clear_layer(self, layer_key: str) -> None:
        """Drop every sample of one layer (after an out-of-memory shrink)."""
        queue = self.queues.pop(layer_key, None)
        for sample in queue or ():
            self._drop(sample)
        self.counters.cleared += 1

    def choose(self, layer_key: str, generator: torch.Generator) -> ReplaySample | None:
        """A uniformly random sample of `layer_key` (seeded), or None when the layer has none."""
        queue = self.queues.get(layer_key)
        if not queue:
            return None
        i = int(torch.randint(len(queue), (1,), generator=generator))
        return queue[i]

    # ---- state ---------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {
            "counters": self.counters.to_json(),
            "bytes_used": self.bytes_used,
            "peak_bytes": self.peak_bytes,
            "samples": {k: len(q) for k, q in self.queues.items() if q},
        }

    def export(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """Every stored sample as tensors plus JSON records (for checkpoints that keep the replay)."""
        tensors: dict[str, torch.Tensor] = {}
        records: list[dict[str, Any]] = []
        for key, queue in self.queues.items():
            for s in queue:
                name = f"replay/{s.seq}"
                for part in ("q", "k", "v", "teacher"):
                    tensors[f"{name}/{part}"] = getattr(s, part)
                if s.mask is not None:
                    tensors[f"{name}/mask"] = s.mask
                if s.query_index is not None:
                    tensors[f"{name}/query_index"] = s.query_index
                records.append(
                    {"seq": s.seq, "layer_key": key, "call": _call_json(s.call), "mask": s.mask is not None}
                )
        return tensors, records

    def restore(
        self,
        tensors: dict[str, torch.Tensor],
        records: list[dict[str, Any]],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        """Refill from `export()` output (in sequence order), under this buffer's own budget."""
        next_seq = self.counters.next_seq
        checked = [_record(r, i) for i, r in enumerate(records)]
        for seq, layer_key, call, has_mask in sorted(checked, key=lambda r: r[0]):
            name = f"replay/{seq}"
            try:
                parts = {p: tensors[f"{name}/{p}"] for p in ("q", "k", "v", "teacher")}
            except KeyError as exc:
                raise ValueError(f"replay sample {seq} of layer {layer_key}: missing tensor {exc}") from None
            mask = tensors.get(f"{name}/mask") if has_mask else None
            _check_sample_shapes(name, parts, tensors.get(f"{name}/query_index"), mask)
            sample = ReplaySample(
                layer_key,
                *(to_storage(parts[p], dtype, device) for p in ("q", "k", "v", "teacher")),
                mask=None if mask is None else to_storage(mask, dtype, device),
                call=call,
                query_index=tensors.get(f"{name}/query_index"),  # absent: every query, or an older file
            )
            self.counters.next_seq = seq
            self.push(sample)
            self.counters.pushed -= 1  # restoring is not a new push
        self.counters.next_seq = max(next_seq, self.counters.next_seq)


def _call_json(call: AttentionCall) -> dict[str, Any]:
    data = dict(call.__dict__)
    data.pop("shard", None)  # a distilled call is never a shard (the session does not distil sharded calls)
    if data.get("latent_grid") is not None:
        data["latent_grid"] = list(data["latent_grid"])
    return data


def _record(raw: Any, i: int) -> tuple[int, str, AttentionCall, bool]:
    """`(seq, layer_key, call, has_mask)` of one saved replay record, strictly read."""
    m = MetaReader(raw, f"replay.records[{i}]")
    return m.get_int("seq", lo=0), m.get_str("layer_key"), _call_from_json(m.get_obj("call")), \
        m.get_bool("mask", False)


def _check_sample_shapes(name: str, parts: dict[str, torch.Tensor], query_index: torch.Tensor | None,
                         mask: torch.Tensor | None) -> None:
    """A saved sample's tensors must be `[B, H, N, D]` and agree with each other (a training update needs it)."""
    q, k, v, teacher = (parts[p] for p in ("q", "k", "v", "teacher"))
    if any(t.dim() != 4 for t in (q, k, v, teacher)) or not all(t.is_floating_point() for t in (q, k, v, teacher)) \
            or k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or teacher.shape[:3] != q.shape[:3] \
            or q.shape[3] != k.shape[3] or teacher.shape[3] != v.shape[3]:
        raise ValueError(f"replay sample {name}: tensors q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"teacher {tuple(teacher.shape)} are not one attention call's [B, H, N, D]")
    if query_index is not None and (query_index.dim() != 1 or query_index.numel() != q.shape[2]
                                    or query_index.dtype not in (torch.int64, torch.int32)):
        raise ValueError(f"replay sample {name}: query_index {tuple(query_index.shape)} {query_index.dtype} does "
                         f"not index q's {q.shape[2]} queries")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[1] != k.shape[2]
                             or mask.shape[0] not in (1, k.shape[0])):
        raise ValueError(f"replay sample {name}: mask {tuple(mask.shape)} {mask.dtype} is not a [B, Nk] bool key "
                         f"padding of k {tuple(k.shape)}")


_CALL_FIELDS: dict[str, tuple[type, ...]] = {
    "layer_key": (str,), "block_type": (str,), "block_index": (int,), "sigma": (int, float, type(None)),
    "step_index": (int, type(None)), "num_steps": (int, type(None)), "cond": (bool, type(None)),
    "cfg_scale": (int, float, type(None)), "n_cond_tokens": (int,), "n_image_tokens": (int,),
    "latent_grid": (list, type(None)), "host": (str,),
}


def _call_from_json(m: MetaReader) -> AttentionCall:
    data = dict(m.data)
    for key, value in data.items():
        types = _CALL_FIELDS.get(key)
        if types is None:
            raise ValueError(f"field {m.where(key)}: not a field of an attention call")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"field {m.where(key)}: got {value!r}, expected {' or '.join(t.__name__ for t in types)}")
    grid = data.get("latent_grid")
    if grid is not None:
        if len(grid) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in grid):
            raise ValueError(f"field {m.where('latent_grid')}: got {grid!r}, expected [h, w] positive integers")
        data["latent_grid"] = (grid[0], grid[1])
    if "layer_key" not in data:
        raise ValueError(f"field {m.where('layer_key')}: missing")
    return AttentionCall(**data)
