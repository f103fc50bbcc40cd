"""Which model a checkpoint's learned layers were distilled on: a fingerprint of each attention layer's weights.

A learned layer fits the attention of the model it was distilled on, and readiness was measured there. Served on
another model — a fine-tune of it — it can break the image while every layer still reads ready: on the testbed, the
all-layer checkpoint of the default model served on a 4 000-step fine-tune of it (the 64 × 64 testbed) followed 12 %
of the prompts' cells instead of 99.9 %, although the attention inputs' norms differ by under 2 %. The projection
weights tell the models apart: that fine-tune moved the q and k projections by 12–17 % (relative L2), storing them in
bf16 moves them by 0.2 %, in e4m3 by 2.7 %.

A host hands the session each layer's fingerprint (`fingerprint` of the weights that make its q and k) when it binds
the model; the session stores them in checkpoints (component `model`) and compares a loaded checkpoint's with the
bound model's (`differing`): layers beyond `OTHER_MODEL_DISTANCE` are not served (`Session.bind_model`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

#: The checkpoint component that holds the fingerprints: tensors {layer_key: fingerprint}, meta below.
COMPONENT = "model"
FORMAT = "attnplug.model"
VERSION = 1
#: Elements sampled from each weight (evenly spaced over its flattened values).
ELEMENTS = 256
#: Relative L2 distance of two fingerprints from which they count as two models: above storage in e4m3 (2.7 %),
#: below the testbed's fine-tune (12–17 %).
OTHER_MODEL_DISTANCE = 0.06


def fingerprint(weights: Sequence[torch.Tensor], elements: int = ELEMENTS) -> torch.Tensor:
    """`[len(weights) · elements]` fp32 on the CPU: `elements` evenly spaced values of each weight, flattened (the same
    positions for the same shapes, so any dtype or device of the same weights gives nearly the same vector). Reads
    the weights once (a device sync: call it when binding a model, never per call)."""
    parts = []
    for w in weights:
        flat = w.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(elements, flat.numel()), device=flat.device).round().long()
        parts.append(flat.index_select(0, idx).float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0)


def distance(recorded: torch.Tensor, bound: torch.Tensor) -> float:
    """Relative L2 distance `‖bound − recorded‖ / ‖recorded‖`; +inf where the shapes differ (another architecture)."""
    if recorded.shape != bound.shape:
        return float("inf")
    return float((bound.float() - recorded.float()).norm() / recorded.float().norm().clamp_min(1e-30))


def differing(recorded: Mapping[str, torch.Tensor], bound: Mapping[str, torch.Tensor],
              threshold: float = OTHER_MODEL_DISTANCE) -> dict[str, float]:
    """The layers both hold whose fingerprints are more than `threshold` apart: {layer_key: distance}."""
    out = {key: distance(recorded[key], bound[key]) for key in sorted(set(recorded) & set(bound))}
    return {key: d for key, d in out.items() if d > threshold}


def component(fingerprints: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The checkpoint component of `fingerprints`: (tensors, meta)."""
    return dict(fingerprints), {"format": FORMAT, "version": VERSION, "elements": ELEMENTS}


def from_component(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The fingerprints of a checkpoint's `model` component; ValueError naming the field on another format."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"component {COMPONENT!r}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"component {COMPONENT!r}: version {meta.get('version')!r}, this attnplug reads {VERSION}")
    return {str(k): v for k, v in tensors.items()}
