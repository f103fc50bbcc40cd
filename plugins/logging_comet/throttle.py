"""Which metric events go to Comet now: one in `every` per key, within a budget of values per minute.

A token bucket of `per_minute` values refilled at `per_minute / 60` per second. An event that is
skipped or over budget is held back as its key's pending event (a newer one replaces it); `flush`
hands back every pending event, so the final step of each scope and layer always reaches Comet.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Hashable


class Throttle:
    def __init__(self, every: int, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.tokens = self.capacity
        self.stamp = clock()
        self.seen: Counter = Counter()
        self.pending: dict[Hashable, tuple[int, dict[str, float]]] = {}
        self.held = 0  # events held back (sent later or superseded)

    def admit(self, key: Hashable, step: int, values: dict[str, float]) -> bool:
        """Whether this event goes out now (its values taken from the budget); else it is held back."""
        self.seen[key] += 1
        if (self.seen[key] - 1) % self.every == 0 and self._take(len(values)):
            self.pending.pop(key, None)
            return True
        self.pending[key] = (step, values)
        self.held += 1
        return False

    def flush(self) -> list[tuple[Hashable, int, dict[str, float]]]:
        """Every pending event, oldest key first; their values are charged to the budget (it may go below 0)."""
        items = [(key, step, values) for key, (step, values) in self.pending.items()]
        self.pending.clear()
        self._refill()
        self.tokens -= sum(len(values) for _, _, values in items)
        return items

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def _take(self, n: int) -> bool:
        self._refill()
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False
