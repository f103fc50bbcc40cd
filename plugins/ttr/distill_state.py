"""Reading the online distiller's checkpoint state (component `distiller.<name>`) strictly, before any of it is used.

`parse_state` turns the component's tensors and JSON meta into a `DistillerSnapshot` — plain values, every field
type-checked (`MetaReader`), every floating tensor finite, the generator state tried on a scratch generator, the
replay rebuilt in a buffer of its own — so `OnlineDistiller.prepare_state` can refuse a file without touching
the live distiller, and its commit only assigns. A layer the distiller state says was trained (updates, ready,
optimizer state) must have its weights in the same file: otherwise an untrained layer would be marked ready.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Collection

import torch

from ...core.checkpoint import MetaReader, require_finite
from .readiness import LayerReadiness
from .replay import ReplayBuffer, ReplayCounters

log = logging.getLogger("attnplug")

STATE_FORMAT = "attnplug.distill"
STATE_VERSION = 1


@dataclass
class LayerEntry:
    """One layer of the distiller state."""

    key: str
    readiness: LayerReadiness
    query_cap: int | None  # None: not saved (the config's)
    oom_events: int
    shrinks: list[dict[str, Any]]
    disabled: bool
    metrics: dict[str, float]
    optimizer: dict[str, torch.Tensor]  # flattened optimizer state (empty: none saved)


@dataclass
class DistillerSnapshot:
    """Everything `OnlineDistiller.state()` wrote, validated."""

    rng_state: torch.Tensor
    total_updates: int
    flush_counts: dict[str, int]
    skipped: dict[str, int]
    known_layers: list[str]
    current: list[str]
    last_sigma: float | None
    run_structured: bool
    layers: list[LayerEntry] = field(default_factory=list)
    counters: ReplayCounters = field(default_factory=ReplayCounters)
    replay: ReplayBuffer | None = None  # the restored samples, when the file kept them


def parse_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, student: str,
                file_layers: Collection[str] | None, current_settings: dict[str, dict[str, Any]],
                replay_like: ReplayBuffer, storage_dtype: torch.dtype) -> DistillerSnapshot:
    """Validate a distiller component; raise ValueError / `CheckpointError` naming the field or tensor.

    :param student: the configured student backend (the file must train the same one).
    :param file_layers: the student's layers whose weights this file holds (None: not known, not checked).
    :param current_settings: `{"readiness": ..., "optimizer": ...}` of the config, to log differences (the
        config wins).
    :param replay_like: the live replay, whose budget a restored replay gets.
    """
    m = MetaReader(meta)
    version = meta.get("version")
    if meta.get("format") != STATE_FORMAT or type(version) is not int or version != STATE_VERSION:
        raise ValueError(f"distiller state: format {meta.get('format')!r} version {version!r}, expected "
                         f"{STATE_FORMAT!r} version {STATE_VERSION}")
    if m.get_str("student", None) != student:
        raise ValueError(f"distiller state trains backend {meta.get('student')!r}, the config's student is "
                         f"{student!r}")
    for what, key in (("readiness", "rule"), ("optimizer", "optim")):
        saved, current = m.get_obj(key, {}).data, current_settings[what]
        diff = {k: (saved.get(k), v) for k, v in current.items() if k in saved and saved.get(k) != v}
        if diff:
            log.info("attnplug: distiller: %s settings differ from the checkpoint; the config wins: %s", what,
                     ", ".join(f"{k}: file {a!r} -> config {b!r}" for k, (a, b) in diff.items()))
    require_finite(tensors)
    if "rng" not in tensors:
        raise ValueError("distiller state: missing tensor 'rng'")
    rng_state = tensors["rng"].detach().to("cpu", torch.uint8).clone()
    try:
        torch.Generator().set_state(rng_state)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"distiller state: tensor 'rng' is not a generator state ({exc})") from None

    snap = DistillerSnapshot(
        rng_state=rng_state,
        total_updates=m.get_int("total_updates", 0, lo=0),
        flush_counts=m.get_counts("flush_counts"),
        skipped=m.get_counts("skipped"),
        known_layers=m.get_str_list("known_layers", []),
        current=m.get_str_list("current", []),
        last_sigma=m.get_float("last_sigma", None, optional=True),
        run_structured=m.get_bool("run_structured", False),
    )
    seen: set[str] = set()
    for i, raw in enumerate(m.get_list("layers", [])):
        entry = _layer_entry(MetaReader(raw, f"layers[{i}]"), i, tensors)
        if entry.key in seen:
            raise ValueError(f"distiller state: layer {entry.key} is listed twice")
        seen.add(entry.key)
        trained = entry.readiness.updates > 0 or entry.readiness.ready or bool(entry.optimizer)
        if trained and file_layers is not None and entry.key not in file_layers:
            raise ValueError(f"distiller state: layers[{i}] ({entry.key}) was trained, but the file holds no "
                             f"weights of backend {student!r} for that layer; refusing to mark an untrained layer "
                             "ready")
        snap.layers.append(entry)

    replay = m.get_obj("replay", {})
    snap.counters = ReplayCounters.from_json(replay.get_obj("counters", {}).data)
    records = replay.get_list("records", [])
    if records:
        # restored on the CPU into a buffer of its own (same budget); samples move to the training device when used
        snap.replay = ReplayBuffer(replay_like.max_bytes, replay_like.per_layer)
        snap.replay.counters = ReplayCounters.from_json(snap.counters.to_json())
        snap.replay.restore(tensors, records, storage_dtype, "cpu")
    return snap


def _layer_entry(lm: MetaReader, i: int, tensors: dict[str, torch.Tensor]) -> LayerEntry:
    prefix = f"layer{i}/"
    shrinks = lm.get_list("shrinks", [])
    if not all(isinstance(x, dict) for x in shrinks):
        raise ValueError(f"distiller state: field {lm.where('shrinks')}: expected a list of objects")
    metrics = lm.get_obj("metrics", {})
    return LayerEntry(
        key=lm.get_str("layer_key"),
        readiness=LayerReadiness.from_json(lm.get_obj("readiness", {}).data, lm.where("readiness")),
        query_cap=lm.get_int("query_cap", lo=1) if "query_cap" in lm.data else None,
        oom_events=lm.get_int("oom_events", 0, lo=0),
        shrinks=list(shrinks),
        disabled=lm.get_bool("disabled", False),
        metrics={k: metrics.get_float(k) for k in metrics.data},  # type: ignore[misc]
        optimizer={n[len(prefix):]: t.detach().clone() for n, t in tensors.items() if n.startswith(prefix)},
    )
