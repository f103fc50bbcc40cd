"""Checkpoint state of the ttr backend (component `backend.ttr` of an attnplug checkpoint).

Tensors: `<layer_key>/<parameter name>` (fp32). Meta (JSON):

    {"format": "attnplug.ttr", "version": 2,
     "settings": {every [plugins.ttr] field},
     "layers": {layer_key: {"heads": H, "head_dim": D, "ready": bool, "chunks": [kc, qc] | null}},
     "landmark": {the landmark settings in use when saved} | null}

Precedence rule when the checkpoint and the config disagree (one rule, by field class, see
settings.py): ARCHITECTURE fields must match or loading is refused (ValueError naming every
differing field with both values); for RUNTIME fields the config wins; INIT_ONLY fields are
irrelevant to loaded layers (their weights carry the learned values). Every difference that does
not refuse is logged with the winner. Landmark settings recorded in the file are informational:
the active `[plugins.landmark]` config wins, and a difference is logged.

Loading validates everything before it changes anything: on any error the backend is untouched.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ...core.call import LayerSpec
from .settings import ARCHITECTURE_FIELDS, INIT_ONLY_FIELDS, RUNTIME_FIELDS

if TYPE_CHECKING:
    from .backend import TtrBackend

log = logging.getLogger("attnplug")

FORMAT = "attnplug.ttr"
#: 2 (session 7): layers carry `d_reference`, the running mean of d; an attnplug that reads only 1 refuses such
#: files by version instead of by an unexpected tensor.
VERSION = 2
READS = (1, 2)
#: Tensors a layer has that files written before them lack; loading keeps the fresh layer's value (the running
#: reference of d: zeros = none kept, so such a layer serves with the call's own mean).
ADDED_TENSORS = ("d_reference",)


def with_added_tensors(got: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`got` (a layer's tensors from a file) plus the fresh layer's `ADDED_TENSORS` it lacks."""
    return {**{n: fresh[n] for n in ADDED_TENSORS if n in fresh and n not in got}, **got}


def backend_state(backend: "TtrBackend") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON meta of every built layer."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for key, module in sorted(backend.layers.items()):
        spec = backend.specs[key]
        for name, t in module.state_dict().items():
            tensors[f"{key}/{name}"] = t.detach()
        chunks = backend.chunks.get(key)
        layers[key] = {"heads": spec.heads, "head_dim": spec.head_dim, "ready": bool(backend.ready.get(key, False)),
                       "chunks": list(chunks) if chunks else None}
    meta = {"format": FORMAT, "version": VERSION, "settings": backend.settings.model_dump(), "layers": layers,
            "landmark": backend.landmark_settings()}
    return tensors, meta


def check_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Refusals (architecture mismatches); logs the runtime / init-only differences and who wins."""
    refusals = []
    for fld in ARCHITECTURE_FIELDS:
        if fld not in saved:
            refusals.append(f"settings.{fld}: missing from the checkpoint")
        elif saved[fld] != current[fld]:
            refusals.append(f"{fld}: checkpoint has {saved[fld]!r}, config has {current[fld]!r} (architecture "
                            f"fields must match: set [plugins.ttr] {fld} = {_toml(saved[fld])} to load this file)")
    for fld in RUNTIME_FIELDS:
        if fld in saved and saved[fld] != current[fld]:
            log.info("attnplug: ttr checkpoint: %s is %r in the file and %r in the config; the config wins "
                     "(runtime setting)", fld, saved[fld], current[fld])
    for fld in INIT_ONLY_FIELDS:
        if fld in saved and saved[fld] != current[fld]:
            log.info("attnplug: ttr checkpoint: %s is %r in the file and %r in the config; it only initialises "
                     "new layers, loaded layers keep their learned values", fld, saved[fld], current[fld])
    return refusals


def load_backend_state(backend: "TtrBackend", tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore `backend_state`; raise ValueError naming the mismatch (nothing changes on error)."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") not in READS:
        raise ValueError(f"ttr state version {meta.get('version')!r}, this attnplug reads {' and '.join(map(str, READS))}")
    saved = meta.get("settings")
    layers_meta = meta.get("layers")
    if not isinstance(saved, dict) or not isinstance(layers_meta, dict):
        raise ValueError("meta needs 'settings' and 'layers' objects")
    refusals = check_settings(saved, backend.settings.model_dump())
    if refusals:
        hint = _landmark_hint(meta.get("landmark"), backend.landmark_settings())
        raise ValueError("checkpoint does not match the config: " + "; ".join(refusals) + hint)

    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        key, sep, param = name.rpartition("/")
        if not sep or key not in layers_meta:
            raise ValueError(f"tensor {name!r} belongs to no layer listed in the meta")
        by_layer.setdefault(key, {})[param] = t

    built: dict[str, tuple[LayerSpec, torch.nn.Module, dict[str, Any]]] = {}
    for key, info in layers_meta.items():
        try:
            spec = LayerSpec(layer_key=key, heads=int(info["heads"]), head_dim=int(info["head_dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"layer {key}: bad spec {info!r} ({exc})") from None
        known = backend.specs.get(key)
        if known is not None and known != spec:
            raise ValueError(f"layer {key}: checkpoint has {spec.heads} heads x {spec.head_dim}, the model has "
                             f"{known.heads} heads x {known.head_dim}")
        with torch.inference_mode(False):
            module = backend.build_layer(spec)
            expected = module.state_dict()
            got = with_added_tensors(by_layer.get(key, {}), expected)
            missing = sorted(set(expected) - set(got))
            unexpected = sorted(set(got) - set(expected))
            if missing or unexpected:
                raise ValueError(f"layer {key}: tensors do not match the architecture (missing {missing}, "
                                 f"unexpected {unexpected})")
            for param, t in got.items():
                if tuple(t.shape) != tuple(expected[param].shape):
                    raise ValueError(f"layer {key}: tensor {param} has shape {tuple(t.shape)}, expected "
                                     f"{tuple(expected[param].shape)}")
                if not t.is_floating_point():
                    raise ValueError(f"layer {key}: tensor {param} has dtype {t.dtype}, expected floating point")
            module.load_state_dict({p: t.to(torch.float32) for p, t in got.items()}, strict=True)
        chunks = info.get("chunks")
        if chunks is not None and (not isinstance(chunks, list) or len(chunks) != 2 or min(chunks) < 1):
            raise ValueError(f"layer {key}: chunks must be [key_chunk, query_chunk] >= 1, got {chunks!r}")
        built[key] = (spec, module, info)

    _log_landmark(meta.get("landmark"), backend.landmark_settings())
    without = sorted(k for k, (_, m, _) in built.items()
                     if m.adaptive and m.alpha_reference == "running" and not m.reference_tracked)
    if without:
        log.info("attnplug: ttr checkpoint: %d layer(s) (%s) have no running mean of d (a file written before "
                 "attnplug kept one, or never trained): adaptive α uses each call's own mean there (the fused "
                 "kernels take two passes over the queries); distilling a layer again, even briefly, keeps one",
                 len(without), ", ".join(without))
    # validated: commit
    for key, (spec, module, info) in built.items():
        old = backend.layers.get(key)
        device = next(old.parameters()).device if old is not None and any(True for _ in old.parameters()) else None
        if device is not None:
            with torch.inference_mode(False):
                module = module.to(device)
        backend.layers[key] = module
        backend.specs[key] = spec
        backend.ready[key] = bool(info.get("ready", False))
        if info.get("chunks"):
            backend.chunks[key] = (int(info["chunks"][0]), int(info["chunks"][1]))
        else:
            backend.chunks.pop(key, None)


def _landmark_diffs(saved: Any, current: dict[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    """`{field: (file's value, config's value)}` of the landmark settings recorded in a checkpoint."""
    if not isinstance(saved, dict) or current is None:
        return {}
    diffs = {k: (saved.get(k), v) for k, v in current.items() if k in saved and saved.get(k) != v}
    if saved.get("window", 0) != current.get("window", 0):  # checkpoints older than the window lack the key
        diffs["window"] = (saved.get("window", 0), current.get("window", 0))
    return diffs


def _landmark_hint(saved: Any, current: dict[str, Any] | None) -> str:
    """For a refusal: the landmark settings the file was trained with that the config does not have (the
    config would win for those, so a user fixing the refusal should pin them too), or ''."""
    diffs = {k: v for k, v in _landmark_diffs(saved, current).items() if k != "query_chunk"}  # runtime only
    if not diffs:
        return ""
    want = ", ".join(f"{k} = {_toml(f)}" for k, (f, _) in diffs.items())
    have = ", ".join(f"{k} = {_toml(c)}" for k, (_, c) in diffs.items())
    return (f". The file was also trained with [plugins.landmark] {want} (the config has {have}); for those "
            "the config wins, so set them too to serve the file as it was trained")


def _log_landmark(saved: Any, current: dict[str, Any] | None) -> None:
    if saved is None or current is None:
        if saved is not None and current is None:
            log.info("attnplug: ttr checkpoint was saved with a landmark branch; none is active now, so ttr "
                     "layers run kernel-only")
        return
    diffs = _landmark_diffs(saved, current)
    if diffs:
        # a warning, not info: the layers were trained against the file's residual branch (a different
        # window, say, moves the output much more than a different fraction)
        log.warning("attnplug: ttr checkpoint: landmark settings differ (file, config): %s; the config wins",
                    diffs)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
