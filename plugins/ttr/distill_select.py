"""Which layers train in a step: a seeded random set, drawn once per step, within a layer filter.

Training every eligible layer on every call makes each step slow; a random set per step spreads
training over all layers over time at a fraction of the cost. The set size is uniform in
[min_layers, max_layers] (max −1 = all known eligible layers), members drawn without replacement.

Layers are learned as the host calls them: the set of a step is drawn from the eligible layers known
at the step's start. A layer first seen during a step (the very first step, or a new model) joins
that step's set while the set is smaller than `max_layers` (all, when −1), so the first step trains
too and no layer waits for a second run to be discovered.
"""

from __future__ import annotations

import torch

from ...core.patterns import any_layer_matches


class LayerSelector:
    """Keeps the known eligible layers and the current step's training set."""

    def __init__(self, include: list[str], exclude: list[str], min_layers: int, max_layers: int) -> None:
        self.include = list(include)
        self.exclude = list(exclude)
        self.min_layers = int(min_layers)
        self.max_layers = int(max_layers)
        self.known: list[str] = []  # eligible layers in first-seen order (stable: the draw depends on it)
        self._known_set: set[str] = set()
        self._eligible: dict[str, bool] = {}
        self.current: set[str] = set()
        self.disabled: set[str] = set()  # layers whose training stopped (out of memory)

    def eligible(self, layer_key: str) -> bool:
        """Whether the layer filter admits `layer_key` (cached)."""
        hit = self._eligible.get(layer_key)
        if hit is None:
            hit = self._eligible[layer_key] = any_layer_matches(
                self.include, layer_key
            ) and not any_layer_matches(self.exclude, layer_key)
        return hit

    def _cap(self) -> int:
        return len(self.known) if self.max_layers < 0 else self.max_layers

    def wants(self, layer_key: str) -> bool:
        """Whether `layer_key` trains in the current step (discovering it if it is new)."""
        if layer_key in self.current:
            return True
        if not self.eligible(layer_key) or layer_key in self.disabled:
            return False
        if layer_key not in self._known_set:
            self.known.append(layer_key)
            self._known_set.add(layer_key)
            if self.max_layers < 0 or len(self.current) < self.max_layers:
                self.current.add(layer_key)
                return True
        return False

    def add_known(self, layer_keys: list[str]) -> None:
        for key in layer_keys:
            if key not in self._known_set and self.eligible(key):
                self.known.append(key)
                self._known_set.add(key)

    def draw(self, generator: torch.Generator) -> set[str]:
        """Draw the set of a new step (seeded)."""
        pool = [k for k in self.known if k not in self.disabled]
        if not pool:
            self.current = set()
            return self.current
        hi = min(len(pool), self._cap() if self.max_layers >= 0 else len(pool))
        lo = min(max(self.min_layers, 0), hi)
        size = lo + int(torch.randint(hi - lo + 1, (1,), generator=generator)) if hi > lo else hi
        order = torch.randperm(len(pool), generator=generator)[:size].tolist()
        self.current = {pool[i] for i in order}
        return self.current
