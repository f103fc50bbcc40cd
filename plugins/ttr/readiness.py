"""Per-layer readiness: per-run accumulators, one EMA update per flush, hysteresis.

Why per run: the calls of one sampling run are strongly correlated (one prompt, one trajectory),
so updating an EMA per call makes readiness follow a single image. The distiller accumulates the
loss and the cosine distance of every update of a run and folds their run means into the EMA once,
when the run ends (fallbacks: a sigma jump, or a periodic flush when the host gives no run
structure). Readiness uses the EMA cosine distance, which stays interpretable (0 = same direction),
not the Kendall loss, which can be negative.

Hysteresis: a layer enters the ready state at `ema_cos <= threshold` (with at least `min_updates`
updates) and leaves it only when `ema_cos > exit_factor * threshold`, so a layer near the boundary
does not flap between student and teacher from one run to the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ...core.checkpoint import MetaReader


@dataclass
class ReadinessRule:
    """Thresholds of the ready state (from the config; the config wins over a checkpoint)."""

    threshold: float = 0.12
    min_updates: int = 24
    exit_factor: float = 1.2
    decay: float = 0.9

    def next_ready(self, ready: bool, ema_cos: float | None, updates: int) -> bool:
        """The ready state after an EMA update: enter at <= threshold, leave above exit_factor * threshold."""
        if ema_cos is None or updates < self.min_updates or math.isnan(ema_cos):  # NaN is never ready
            return False
        if ready:
            return ema_cos <= self.exit_factor * self.threshold
        return ema_cos <= self.threshold


@dataclass
class LayerReadiness:
    """Accumulators, EMA and ready flag of one layer."""

    updates: int = 0  # optimizer updates ever applied to this layer
    ema_loss: float | None = None
    ema_cos: float | None = None
    ready: bool = False
    flushes: int = 0
    run_loss_sum: float = 0.0
    run_cos_sum: float = 0.0
    run_count: int = 0
    last_loss: float | None = None
    last_cos: float | None = None
    history: list[float] = field(default_factory=list, repr=False)  # EMA cos after each flush (last 64)

    def record(self, loss: float, cos_dist: float) -> None:
        """Add one update's Kendall loss and cosine distance (clamped to [0, 1]) to the run accumulators."""
        cos_dist = min(max(cos_dist, 0.0), 1.0)
        self.updates += 1
        self.last_loss, self.last_cos = loss, cos_dist
        self.run_loss_sum += loss
        self.run_cos_sum += cos_dist
        self.run_count += 1

    def flush(self, rule: ReadinessRule) -> bool:
        """Fold the run means into the EMA (the first EMA value is the first run mean); returns whether
        the ready flag changed. No-op (False) when nothing was accumulated."""
        if self.run_count == 0:
            return False
        loss = self.run_loss_sum / self.run_count
        cos = self.run_cos_sum / self.run_count
        self.run_loss_sum = self.run_cos_sum = 0.0
        self.run_count = 0
        return self.push_ema(loss, cos, rule)

    def push_ema(self, loss: float, cos: float, rule: ReadinessRule) -> bool:
        """One EMA update from run means; re-evaluates readiness. Returns whether the flag changed."""
        d = rule.decay
        self.ema_loss = loss if self.ema_loss is None else d * self.ema_loss + (1 - d) * loss
        self.ema_cos = cos if self.ema_cos is None else d * self.ema_cos + (1 - d) * cos
        self.flushes += 1
        self.history = (self.history + [self.ema_cos])[-64:]
        return self.set_from_ema(rule)

    def set_from_ema(self, rule: ReadinessRule) -> bool:
        """Re-evaluate the ready flag from the current EMA; returns whether it changed."""
        new = rule.next_ready(self.ready, self.ema_cos, self.updates)
        changed = new != self.ready
        self.ready = new
        return changed

    def to_json(self) -> dict[str, Any]:
        return {
            "updates": self.updates,
            "ema_loss": self.ema_loss,
            "ema_cos": self.ema_cos,
            "ready": self.ready,
            "flushes": self.flushes,
            "run_loss_sum": self.run_loss_sum,
            "run_cos_sum": self.run_cos_sum,
            "run_count": self.run_count,
            "last_loss": self.last_loss,
            "last_cos": self.last_cos,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "readiness") -> LayerReadiness:
        """Inverse of `to_json`, strict (a checkpoint is untrusted input): integers, finite numbers, JSON
        booleans; raises `CheckpointError` naming the field (`where` is its path in the metadata)."""
        m = MetaReader(data, where)
        out = cls()
        for name in ("updates", "flushes", "run_count"):
            setattr(out, name, m.get_int(name, 0, lo=0))
        for name in ("run_loss_sum", "run_cos_sum"):
            setattr(out, name, m.get_float(name, 0.0))
        for name in ("ema_loss", "ema_cos", "last_loss", "last_cos"):
            setattr(out, name, m.get_float(name, None, optional=True))
        out.ready = m.get_bool("ready", False)
        return out
