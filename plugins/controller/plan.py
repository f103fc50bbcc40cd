"""A serving plan: which (layer, σ band) cells the approximate backend may serve.

Calibration writes it; the plan gate reads it. It travels inside the checkpoint as the component
`controller.plan` (JSON metadata, no tensors) or as a JSON file, and records the fingerprint of the
learned weights it was measured with, so a plan that outlived its weights is detected.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ...core.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint

PLAN_COMPONENT = "controller.plan"
PLAN_FORMAT = "attnplug-serving-plan"
PLAN_VERSION = 1

Cell = tuple[str, int]  # (layer key, band index)


def band_index(edges: tuple[float, ...], sigma: float) -> int:
    """Band of `sigma` for strictly decreasing `edges` ending at 0: band i holds edge[i+1] < σ <= edge[i]."""
    for i in range(len(edges) - 1):
        if sigma > edges[i + 1]:
            return i
    return len(edges) - 2


def band_label(edges: tuple[float, ...], band: int) -> str:
    return f"σ {edges[band + 1]:g}–{edges[band]:g}"


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` (sorted by name); scalars (a joint layer's
    learned log-scale) and bf16 tensors included."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


@dataclass
class ServingPlan:
    """Cells the approximate backend may serve; everything else runs exact.

    :param edges: σ band edges, strictly decreasing, the last 0.
    :param cells: layer key → served band indices.
    :param backend: the learned backend the plan was calibrated for.
    :param fingerprint: `fingerprint_tensors` of that backend's weights at calibration.
    :param report: what calibration measured (budget, per-cell effects, the search), JSON-able.
    """

    edges: tuple[float, ...]
    cells: dict[str, frozenset[int]] = field(default_factory=dict)
    backend: str | None = None
    fingerprint: str | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cells(cls, edges: Iterable[float], cells: Iterable[Cell], **kw: Any) -> "ServingPlan":
        by_layer: dict[str, set[int]] = {}
        for layer, band in cells:
            by_layer.setdefault(layer, set()).add(int(band))
        return cls(tuple(float(e) for e in edges), {k: frozenset(v) for k, v in by_layer.items()}, **kw)

    def cell_list(self) -> list[Cell]:
        return sorted((layer, b) for layer, bands in self.cells.items() for b in bands)

    def allows(self, layer_key: str, sigma: float | None) -> bool:
        """True when the cell of (layer, σ) is in the plan; an unknown σ is never served (fail-closed)."""
        bands = self.cells.get(layer_key)
        if not bands or sigma is None or not math.isfinite(sigma):
            return False
        return band_index(self.edges, sigma) in bands

    def share(self, layer_sigmas: Mapping[str, list[float]]) -> float:
        """Share of layer-steps served: `layer_sigmas` maps every attention layer to the σ of its steps."""
        total = sum(len(s) for s in layer_sigmas.values())
        served = sum(1 for layer, sigmas in layer_sigmas.items() for s in sigmas if self.allows(layer, s))
        return served / total if total else 0.0

    def describe(self) -> str:
        """One line per served layer: which bands."""
        if not self.cells:
            return "no cells (every call exact)"
        n = len(self.edges) - 1
        parts = []
        for layer in sorted(self.cells):
            bands = sorted(self.cells[layer])
            parts.append(f"{layer}: all σ" if len(bands) == n else
                         f"{layer}: " + ", ".join(band_label(self.edges, b) for b in bands))
        return "; ".join(parts)

    # ---- storage -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "edges": list(self.edges),
                "cells": {k: sorted(v) for k, v in sorted(self.cells.items())}, "backend": self.backend,
                "fingerprint": self.fingerprint, "report": self.report}

    @classmethod
    def from_json(cls, data: Any, source: str) -> "ServingPlan":
        """Validate and build; every problem raises a `CheckpointError` naming `source` and the field."""
        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"serving plan in {source}: {what}")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise bad(f"format {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        if data.get("version") != PLAN_VERSION:
            raise bad(f"version {data.get('version')!r}; this attnplug reads version {PLAN_VERSION}")
        edges = data.get("edges")
        if (not isinstance(edges, list) or len(edges) < 2 or
                not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in edges)
                or any(b >= a for a, b in zip(edges, edges[1:])) or edges[-1] != 0):
            raise bad(f"field 'edges' must be >= 2 finite, strictly decreasing numbers ending at 0, got {edges!r}")
        n = len(edges) - 1
        raw = data.get("cells")
        if not isinstance(raw, dict):
            raise bad(f"field 'cells' must be an object layer → band indices, got {type(raw).__name__}")
        cells: dict[str, frozenset[int]] = {}
        for layer, bands in raw.items():
            if (not isinstance(bands, list) or
                    not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < n for b in bands)):
                raise bad(f"field 'cells.{layer}' must list band indices in [0, {n - 1}], got {bands!r}")
            cells[str(layer)] = frozenset(bands)
        for key in ("backend", "fingerprint"):
            if data.get(key) is not None and not isinstance(data.get(key), str):
                raise bad(f"field {key!r} must be a string or null, got {data.get(key)!r}")
        report = data.get("report", {})
        if not isinstance(report, dict):
            raise bad("field 'report' must be an object")
        return cls(tuple(float(e) for e in edges), cells, data.get("backend"), data.get("fingerprint"), report)

    def save_json(self, path: str | Path) -> Path:
        """Write the plan as a JSON file (atomic)."""
        return atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True, allow_nan=False))

    @classmethod
    def load_json(cls, path: str | Path) -> "ServingPlan":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"serving plan {path}: cannot read it ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"serving plan {path}: not valid JSON ({exc})") from None
        return cls.from_json(data, str(path))


def write_plan_into_checkpoint(path: str | Path, plan: ServingPlan) -> Path:
    """Store `plan` as the `controller.plan` component of the checkpoint at `path`, keeping every other
    component as it is (the file is rewritten atomically; a failure leaves it untouched)."""
    components = load_checkpoint(path)
    components[PLAN_COMPONENT] = ({}, plan.to_json())
    return save_checkpoint(path, components)
