"""What a checkpoint means for the model it is bound to: does it fit, and which layers serve.

- `model_layer_shapes(patcher)`: heads × head_dim per layer key, read from ComfyUI's Flux-family
  diffusion model (`double_blocks` / `single_blocks`, each with `num_heads` and `hidden_size`); None
  for models that do not expose them (the binding then checks each layer at its first call).
- `check_fits`: a checkpoint trained on another model is refused before any sampling, naming the file
  and the layers that differ, so it is never trained on (nor overwritten) by mistake.
- `model_fingerprints(patcher)`: each block's q/k projection weights as `core.model_identity` fingerprints
  (which model a checkpoint's layers were distilled on: a fine-tune of the same shapes is told apart).
- `ApplyPlan`: the Apply node's serving plan (ready layers, the best `quality_speed` share of them),
  cached by the checkpoint's fingerprint: when the file changes on disk — more distillation since —
  the next sampling run re-reads it instead of serving the old plan.
No ComfyUI import.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ...core import Session, load_checkpoint, model_identity
from ...core.checkpoint import CheckpointError
from .configs import require_learned, set_field, validated
from .files import fingerprint

log = logging.getLogger("attnplug")

Shapes = dict[str, tuple[int, int]]


def model_layer_shapes(patcher: Any) -> Shapes | None:
    """`{"double:0": (heads, head_dim), ...}` of a ComfyUI Flux-family model; None when it does not tell."""
    dm = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    shapes: Shapes = {}
    for kind in ("double", "single"):
        for i, block in enumerate(getattr(dm, f"{kind}_blocks", None) or ()):
            heads, hidden = getattr(block, "num_heads", None), getattr(block, "hidden_size", None)
            if not (isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden % heads == 0):
                return None
            shapes[f"{kind}:{i}"] = (heads, hidden // heads)
    return shapes or None


def model_fingerprints(patcher: Any) -> dict[str, torch.Tensor]:
    """`{"double:0": fingerprint, ...}` of a ComfyUI Flux-family model: the q and k rows (the first 2 · hidden) of
    each block's fused projections — a double block's `qkv` of both streams, a single block's `linear1`. Blocks
    that do not expose them (or hold them on the meta device) get none."""
    dm = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    out: dict[str, torch.Tensor] = {}
    for kind in ("double", "single"):
        for i, block in enumerate(getattr(dm, f"{kind}_blocks", None) or ()):
            hidden = getattr(block, "hidden_size", None)
            weights = [w for n, w in block.named_parameters() if n.endswith("qkv.weight") or n == "linear1.weight"]
            if not isinstance(hidden, int) or not weights or any(w.is_meta or w.shape[0] < 2 * hidden
                                                                 for w in weights):
                continue
            with torch.no_grad():
                out[f"{kind}:{i}"] = model_identity.fingerprint([w[:2 * hidden] for w in weights])
    return out


def checkpoint_layer_shapes(session: Session) -> Shapes:
    """Heads × head_dim of every layer the session's learned backends know (from its checkpoint)."""
    return {key: (spec.heads, spec.head_dim) for backend in session.learned_backends().values()
            for key, spec in backend.specs.items()}


def check_fits(checkpoint: Path, saved: Shapes, model: Shapes | None, node: str) -> None:
    """Raise `CheckpointError` when a layer of `checkpoint` does not exist in the model or has another shape."""
    if model is None or not saved:
        return
    problems = []
    for key in sorted(saved, key=_layer_order):
        have, want = model.get(key), saved[key]
        if have is None:
            problems.append(f"{key} (this model has no such layer)")
        elif have != want:
            problems.append(f"{key} ({want[0]} heads × {want[1]} in the file, {have[0]} × {have[1]} in this model)")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(f"attnplug {node}: checkpoint {checkpoint} was trained on another model and is left "
                              f"untouched: {len(problems)} of its {len(saved)} layers do not fit: {shown}. Choose this "
                              "model's checkpoint, or a new file name to train one.")


def check_distill_checkpoint(data: Mapping[str, Any], model: Shapes | None) -> None:
    """Before sampling: the Distill node's checkpoint, when it exists, loads under the config and fits the model."""
    path = Path(str(data.get("checkpoint") or ""))
    if not path.is_file():
        return
    probe = Session(copy.deepcopy(dict(data)))  # loading refuses a file that does not fit the config
    try:
        saved = checkpoint_layer_shapes(probe)
    finally:
        probe.close()
    check_fits(path, saved, model, "distill node")


# ---- the Apply node's choice of layers ---------------------------------------------------------------

def layer_scores(session: Session, checkpoint: Path | None) -> dict[str, float]:
    """Per-layer EMA cosine distance (lower = better): from the live distiller when it exposes one,
    else from the distiller's part of the checkpoint metadata. Empty when neither has it."""
    found: dict[str, float] = {}
    distiller = session.distiller
    if distiller is not None:
        for attr in ("readiness", "layers", "layer_states"):
            _collect_scores(getattr(distiller, attr, None), found)
    if not found and checkpoint is not None and checkpoint.is_file():
        for comp, (_, meta) in load_checkpoint(checkpoint).items():
            if comp.startswith("distiller."):
                _collect_scores(meta, found)
    return found


_SCORE_KEYS = ("ema_cos", "ema_cosine_dist", "ema_cos_dist")


def _collect_scores(obj: Any, found: dict[str, float], depth: int = 0) -> None:
    """Find per-layer EMA cosine distances anywhere in `obj` (objects or JSON): `{layer_key: entry}` maps
    or lists of entries carrying a `layer_key`."""
    if obj is None or depth > 4:
        return
    if isinstance(obj, (list, tuple)):  # e.g. [{"layer_key": "single:3", "readiness": {"ema_cos": ...}}, ...]
        for item in obj:
            key = item.get("layer_key") if isinstance(item, Mapping) else getattr(item, "layer_key", None)
            score = _score_of(item) if isinstance(key, str) else None
            if score is not None:
                found[key] = score
            else:
                _collect_scores(item, found, depth + 1)
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if isinstance(key, str) and ":" in key:
                score = _score_of(value)
                if score is not None:
                    found[key] = score
                    continue
            _collect_scores(value, found, depth + 1)


def _score_of(value: Any, depth: int = 0) -> float | None:
    """The EMA cosine distance in a layer's entry: on it directly, or one level down (e.g. `"readiness"`)."""
    for name in _SCORE_KEYS:
        s = value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)
        if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s):
            return float(s)
    if depth == 0 and isinstance(value, Mapping):
        for sub in value.values():
            if isinstance(sub, Mapping) or hasattr(sub, "ema_cos"):
                s = _score_of(sub, 1)
                if s is not None:
                    return s
    return None


def choose_layers(ready: list[str], scores: Mapping[str, float], quality_speed: float) -> list[str]:
    """The ready layers allowed to serve: the best `ceil(quality_speed * len(ready))` by EMA cosine distance
    (layers without a score rank last, then by key). 0 = quality (none), 1 = speed (all ready layers)."""
    if not 0.0 <= quality_speed <= 1.0:
        raise ValueError(f"quality_speed must be in [0, 1], got {quality_speed}")
    k = math.ceil(quality_speed * len(ready) - 1e-9)
    ranked = sorted(ready, key=lambda key: (key not in scores, scores.get(key, 0.0), _layer_order(key)))
    return ranked[:k]


def _layer_order(key: str) -> tuple[str, int, str]:
    kind, _, idx = key.partition(":")
    return (kind, int(idx) if idx.isdigit() else -1, key)


@dataclass(frozen=True)
class CheckpointReading:
    """One reading of the checkpoint: the config to serve with, the chosen and the ready layers."""

    config: dict[str, Any]
    chosen: list[str]
    ready: list[str]
    fingerprint: tuple[Any, ...]


class ApplyPlan:
    """The Apply node's plan for one checkpoint, re-read whenever the file's fingerprint changes.

    `config()` is what the binding builds each sampling run's session from: inference from the
    checkpoint, the router's readiness gates, plus a `layers` gate that lets only the chosen layers serve.
    """

    NODE = "apply node"

    def __init__(self, base: Mapping[str, Any] | None, checkpoint: Path, quality_speed: float,
                 model_shapes: Shapes | None = None) -> None:
        data = copy.deepcopy(dict(base)) if base else {"backend": "ttr"}
        self.backend = require_learned(data, self.NODE)
        set_field(data, "training", False, self.NODE)
        set_field(data, "checkpoint", str(checkpoint), self.NODE)
        self.base = data
        self.checkpoint = checkpoint
        self.quality_speed = quality_speed
        self.model_shapes = model_shapes
        self._plan: CheckpointReading | None = None

    def current(self) -> CheckpointReading:
        """The plan for the file as it is now (read again only when its fingerprint changed)."""
        fp = fingerprint(self.checkpoint)
        if self._plan is None or self._plan.fingerprint != fp:
            old, self._plan = self._plan, self._read(fp)
            if old is not None:
                log.info("attnplug: %s: checkpoint %s changed on disk and was read again: %d of %d ready layers may "
                         "serve (before: %d of %d)", self.NODE, self.checkpoint, len(self._plan.chosen),
                         len(self._plan.ready), len(old.chosen), len(old.ready))
        return self._plan

    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self.current().config)

    def _read(self, fp: tuple[Any, ...]) -> CheckpointReading:
        if not self.checkpoint.is_file():
            raise CheckpointError(f"attnplug {self.NODE}: checkpoint {self.checkpoint}: no such file (it was there "
                                  "when the node ran; train it again with the attnplug Distill node)")
        probe = Session(validated(self.base, f"attnplug {self.NODE}"))
        try:
            backend = probe.learned_backends()[self.backend]
            ready = sorted((k for k, r in backend.ready.items() if r), key=_layer_order)
            scores = layer_scores(probe, self.checkpoint)
            saved = checkpoint_layer_shapes(probe)
            notes = probe.serving_notes()
        finally:
            probe.close()
        check_fits(self.checkpoint, saved, self.model_shapes, self.NODE)
        chosen = choose_layers(ready, scores, self.quality_speed)
        data = copy.deepcopy(self.base)
        data["gates"] = list(data.get("gates", [])) + [{"kind": "layers", "include": chosen}]
        if not ready:
            log.warning("attnplug: %s: checkpoint %s has no ready %s layer; every call stays exact", self.NODE,
                        self.checkpoint, self.backend)
        log.info("attnplug: %s: %d of %d ready layers may serve (quality_speed=%.2f)%s", self.NODE, len(chosen),
                 len(ready), self.quality_speed, "" if scores else "; no EMA cosine distances found, ranked by layer "
                 "order")
        for note in notes:  # the calibrated serving plan stored with the checkpoint, or why there is none
            log.info("attnplug: %s: %s", self.NODE, note)
        return CheckpointReading(validated(data, f"attnplug {self.NODE}"), chosen, ready, fp)
