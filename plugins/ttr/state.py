"""Checkpoint state of the ttr backend (component `backend.ttr` of an attnplug checkpoint).

Tensors: `<layer_key>/<parameter name>` (fp32). Meta (JSON):

    {"format": "attnplug.ttr", "version": 2 | 3,
     "settings": {every [plugins.ttr] field},
     "layers": {layer_key: {"heads": H, "head_dim": D, "ready": bool, "chunks": [kc, qc] | null,
                            "variant": "joint" (joint layers only; absent = the hybrid layer)}},
     "landmark": {the landmark settings in use when saved} | null}

Version 3 is written when the file holds a joint layer (plugins/ttr/joint.py), else 2, so files without one
still load in an attnplug that reads 2. A layer's variant must be the one the config selects for its key
(`[plugins.ttr] joint_layers`), and a file's joint layers must match `[plugins.ttr.joint]`: else loading is
refused, naming the layer and the setting to change.

Precedence rule when the checkpoint and the config disagree (one rule, by field class, see
settings.py): ARCHITECTURE fields must match or loading is refused (ValueError naming every
differing field with both values); for RUNTIME fields the config wins; INIT_ONLY fields are
irrelevant to loaded layers (their weights carry the learned values). Every difference that does
not refuse is logged with the winner. Landmark settings recorded in the file are informational:
the active `[plugins.landmark]` config wins, and a difference is logged.

Loading validates everything before it changes anything (`prepare_backend_state` stages, the session commits
once every component of the file is accepted): on any error the backend is untouched. Declared heads and head
dims are checked against sane limits and the file's tensor shapes before a layer is allocated; `ready` must be
a JSON boolean; non-finite weights are refused naming the tensor.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ...core.backend import StagedState
from ...core.call import LayerSpec
from ...core.checkpoint import MetaReader, require_finite
from .joint_settings import joint_field_names
from .settings import ARCHITECTURE_FIELDS, INIT_ONLY_FIELDS, RUNTIME_FIELDS

if TYPE_CHECKING:
    from .backend import TtrBackend

log = logging.getLogger("attnplug")

FORMAT = "attnplug.ttr"
#: 2: layers carry `d_reference`, the running mean of d; an attnplug that reads only 1 refuses such
#: files by version instead of by an unexpected tensor. 3: the file holds joint layers (their meta says
#: `"variant": "joint"`); written only then, so that an attnplug that reads 2 refuses such files by version.
VERSION = 2
VERSION_JOINT = 3
READS = (1, 2, 3)
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
        if getattr(module, "variant", "hybrid") == "joint":
            layers[key]["variant"] = "joint"
    joint = any(info.get("variant") == "joint" for info in layers.values())
    meta = {"format": FORMAT, "version": VERSION_JOINT if joint else VERSION, "settings": backend.settings.model_dump(),
            "layers": layers, "landmark": backend.landmark_settings()}
    return tensors, meta


def check_variants(saved: dict[str, Any], current: dict[str, Any], layers_meta: dict[str, Any],
                   variant_for: Any) -> list[str]:
    """Refusals: a layer whose variant differs from the one the config selects for its key, and joint layers
    whose `[plugins.ttr.joint]` architecture differs from the config's."""
    refusals = []
    for key, info in sorted(layers_meta.items()):
        in_file = info.get("variant", "hybrid") if isinstance(info, dict) else "hybrid"
        wanted = variant_for(key)
        if in_file != wanted:
            fix = (f"add a pattern matching {key!r} to [plugins.ttr] joint_layers" if in_file == "joint"
                   else f"remove the pattern matching {key!r} from [plugins.ttr] joint_layers "
                        f"(now {current.get('joint_layers')})")
            refusals.append(f"layer {key}: the checkpoint holds a {in_file} layer, the config selects the {wanted} "
                            f"layer for it ({fix}, or distil that layer anew)")
    if any(isinstance(i, dict) and i.get("variant") == "joint" for i in layers_meta.values()):
        file_joint = saved.get("joint") if isinstance(saved.get("joint"), dict) else {}
        for fld in joint_field_names():
            have, want = file_joint.get(fld), current["joint"][fld]
            if have != want:
                refusals.append(f"joint.{fld}: checkpoint has {have!r}, config has {want!r} (the joint layers' "
                                f"architecture must match: set [plugins.ttr.joint] {fld} = {_toml(have)})")
    return refusals


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


#: Sane limits of a layer a checkpoint may declare (checked before anything is allocated): no attention layer
#: has more heads, and backends serve head dims up to 1024 (`Capabilities.head_dims`).
MAX_HEADS = 4096
MAX_HEAD_DIM = 1024


def load_backend_state(backend: "TtrBackend", tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore `backend_state`; raise ValueError naming the mismatch (nothing changes on error)."""
    prepare_backend_state(backend, tensors, meta).commit()


def prepare_backend_state(backend: "TtrBackend", tensors: dict[str, torch.Tensor],
                          meta: dict[str, Any]) -> StagedState:
    """Validate `backend_state` output against `backend` and build its layers, changing nothing live; the
    returned stage installs them. Raises ValueError / `CheckpointError` naming the field or tensor.

    Declared shapes are checked against the file's tensors on the meta device first, so a file that declares
    an impossible layer (e.g. 500 million heads) is refused before anything is allocated."""
    m = MetaReader(meta)
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("version")
    if type(version) is not int or version not in READS:
        reads = ", ".join(map(str, READS[:-1])) + f" and {READS[-1]}"
        raise ValueError(f"ttr state version {version!r}, this attnplug reads {reads}")
    saved = m.get_obj("settings").data
    layers_meta = m.get_obj("layers")
    current = backend.settings.model_dump()
    refusals = check_settings(saved, current) + check_variants(saved, current, layers_meta.data,
                                                                backend.settings.variant_for)
    if refusals:
        hint = _landmark_hint(meta.get("landmark"), backend.landmark_settings())
        raise ValueError("checkpoint does not match the config: " + "; ".join(refusals) + hint)
    require_finite(tensors)

    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        key, sep, param = name.rpartition("/")
        if not sep or key not in layers_meta.data:
            raise ValueError(f"tensor {name!r} belongs to no layer listed in the meta")
        by_layer.setdefault(key, {})[param] = t

    parsed: dict[str, tuple[LayerSpec, bool, tuple[int, int] | None]] = {}
    for key in layers_meta.data:
        info = layers_meta.get_obj(key)
        spec = LayerSpec(layer_key=key, heads=info.get_int("heads", lo=1, hi=MAX_HEADS),
                         head_dim=info.get_int("head_dim", lo=1, hi=MAX_HEAD_DIM))
        known = backend.specs.get(key)
        if known is not None and known != spec:
            raise ValueError(f"layer {key}: checkpoint has {spec.heads} heads x {spec.head_dim}, the model has "
                             f"{known.heads} heads x {known.head_dim}")
        chunks = info.data.get("chunks")
        if chunks is not None and (not isinstance(chunks, list) or len(chunks) != 2
                                   or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chunks)):
            raise ValueError(f"layer {key}: field layers.{key}.chunks must be [key_chunk, query_chunk], integers "
                             f">= 1, got {chunks!r}")
        with torch.device("meta"):  # shapes only: nothing is allocated for a layer the file cannot fill
            expected = {n: (tuple(t.shape), t.dtype) for n, t in backend.build_layer(spec).state_dict().items()}
        got: dict[str, torch.Tensor | None] = dict(by_layer.get(key, {}))
        got.update({n: None for n in ADDED_TENSORS if n in expected and n not in got})  # the fresh layer's value
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        if missing or unexpected:
            raise ValueError(f"layer {key}: tensors do not match the architecture (missing {missing}, "
                             f"unexpected {unexpected})")
        for param, t in got.items():
            if t is None:
                continue
            if tuple(t.shape) != expected[param][0]:
                raise ValueError(f"layer {key}: tensor {param} has shape {tuple(t.shape)}, expected "
                                 f"{expected[param][0]}")
            if not t.is_floating_point():
                raise ValueError(f"layer {key}: tensor {param} has dtype {t.dtype}, expected floating point")
        parsed[key] = (spec, info.get_bool("ready", False), None if chunks is None else (chunks[0], chunks[1]))

    built: dict[str, tuple[LayerSpec, torch.nn.Module, bool, tuple[int, int] | None]] = {}
    for key, (spec, ready, chunks) in parsed.items():
        with torch.inference_mode(False):
            module = backend.build_layer(spec)
            got = with_added_tensors(by_layer.get(key, {}), module.state_dict())
            module.load_state_dict({p: t.to(torch.float32) for p, t in got.items()}, strict=True)
        built[key] = (spec, module, ready, chunks)

    _log_landmark(meta.get("landmark"), backend.landmark_settings())
    without = sorted(k for k, (_, mod, _, _) in built.items()
                     if mod.adaptive and mod.alpha_reference == "running" and not mod.reference_tracked)
    if without:
        log.info("attnplug: ttr checkpoint: %d layer(s) (%s) have no running mean of d (a file written before "
                 "attnplug kept one, or never trained): adaptive α uses each call's own mean there (the fused "
                 "kernels take two passes over the queries); distilling a layer again, even briefly, keeps one",
                 len(without), ", ".join(without))

    def commit() -> None:
        for key, (spec, module, ready, chunks) in built.items():
            old = backend.layers.get(key)
            device = next(old.parameters()).device if old is not None and any(True for _ in old.parameters()) \
                else None
            if device is not None:
                with torch.inference_mode(False):
                    module = module.to(device)
            backend.layers[key] = module
            backend.specs[key] = spec
            backend.ready[key] = ready
            if chunks:
                backend.chunks[key] = chunks
            else:
                backend.chunks.pop(key, None)

    return StagedState(commit, frozenset(built))


#: landmark settings that change how the exact branch is computed at inference, not what the layers were trained
#: against (training computes the branch in fp32 whatever `precision` says): never a difference from the file
_INFERENCE_ONLY = ("precision",)


def _landmark_diffs(saved: Any, current: dict[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    """`{field: (file's value, config's value)}` of the landmark settings recorded in a checkpoint."""
    if not isinstance(saved, dict) or current is None:
        return {}
    diffs = {k: (saved.get(k), v) for k, v in current.items()
             if k in saved and saved.get(k) != v and k not in _INFERENCE_ONLY}
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
