"""Config building behind the nodes: plain attnplug config dicts in, validated copies out.

The `ATTNPLUG_CONFIG` socket carries a plain config dict. Nodes never mutate the dict they receive
(ComfyUI caches node outputs); each returns a deep copy with its changes. When a node's widget
overrides a value the incoming config set explicitly, it says so in the log (never silently).
No ComfyUI import here, except `folder_paths` inside `models_folder` when it is available.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ...core import Session, get_plugins, load_checkpoint
from ...core.config import load_config, read_config_file

log = logging.getLogger("attnplug")

FOLDER = "attnplug"
SUFFIX = ".safetensors"


def models_folder() -> Path:
    """`models/attnplug/` of the running ComfyUI (or a folder registered as `attnplug`); outside
    ComfyUI, `./models/attnplug/`."""
    try:
        import folder_paths  # type: ignore[import-not-found]
    except ImportError:
        return Path.cwd() / "models" / FOLDER
    registered = getattr(folder_paths, "folder_names_and_paths", {}).get(FOLDER)
    if registered and registered[0]:
        return Path(registered[0][0])
    return Path(folder_paths.models_dir) / FOLDER


def resolve_checkpoint(name: str, must_exist: bool) -> Path:
    """A checkpoint path from a widget: absolute paths as given, bare names under `models/attnplug/`;
    `.safetensors` is added when there is no suffix. The folder is created when missing."""
    text = name.strip()
    if not text:
        raise ValueError("checkpoint: give a file name (e.g. 'flux_ttr.safetensors') or an absolute path")
    p = Path(text).expanduser()
    if not p.suffix:
        p = p.with_suffix(SUFFIX)
    if not p.is_absolute():
        p = models_folder() / p
    if must_exist and not p.is_file():
        raise ValueError(f"checkpoint {p}: no such file (train one with the attnplug distill node first)")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def validated(data: Mapping[str, Any], source: str = "<attnplug node>") -> dict[str, Any]:
    """Validate a config dict (raises `ConfigError` naming section and field); returns a deep copy."""
    load_config(dict(data))
    return copy.deepcopy(dict(data))


def build_config(config_path: str, backend: str, exact: str, strict: bool, seed: int, extra_toml: str) -> dict[str, Any]:
    """The config node: a file when `config_path` is set (widgets ignored, logged), else the widgets
    plus an optional TOML fragment merged on top."""
    if config_path.strip():
        data = read_config_file(Path(config_path.strip()).expanduser())
        log.info("attnplug: config node uses %s; its widgets (backend, exact, strict, seed, extra) are ignored",
                 config_path.strip())
        return validated(data, config_path)
    data: dict[str, Any] = {"backend": backend, "exact": exact, "strict": strict, "seed": seed}
    if extra_toml.strip():
        try:
            extra = tomllib.loads(extra_toml)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"attnplug config node: extra TOML is not valid: {exc}") from None
        data = _merge(data, extra)
    return validated(data)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set(data: dict[str, Any], key: str, value: Any, node: str) -> None:
    """Set a root field, logging when it replaces a different explicit value of the incoming config."""
    if key in data and data[key] != value:
        log.info("attnplug: %s sets %s = %r (the incoming config had %r; the node wins)", node, key, value, data[key])
    data[key] = value


def learned_backends() -> list[str]:
    """Names of registered backends that are learned (need training/checkpoints)."""
    reg = get_plugins().collect("backend")
    return sorted(n for n, r in reg.entries.items() if getattr(getattr(r.factory, "capabilities", None), "learned", False))


def registered_backends() -> list[str]:
    return get_plugins().collect("backend").names()


def registered_distillers() -> list[str]:
    return get_plugins().collect("distiller").names()


def _require_learned(data: dict[str, Any], node: str) -> str:
    name = data.get("backend", "sdpa")
    learned = learned_backends()
    if name not in learned:
        raise ValueError(f"attnplug {node}: config backend {name!r} is not a learned backend; this node needs one "
                         f"of {learned or '(none registered — is the ttr plugin installed?)'}")
    return name


def distill_config(base: Mapping[str, Any] | None, checkpoint: Path, distiller: str, mode: str) -> dict[str, Any]:
    """Config of the distill node: training on, the chosen distiller and checkpoint."""
    data = copy.deepcopy(dict(base)) if base else {"backend": "ttr"}
    _require_learned(data, "distill node")
    if distiller not in registered_distillers():
        raise ValueError(f"attnplug distill node: distiller {distiller!r} is not registered; registered: "
                         f"{registered_distillers() or '(none)'}")
    _set(data, "training", True, "distill node")
    _set(data, "distiller", distiller, "distill node")
    _set(data, "mode", mode, "distill node")
    _set(data, "checkpoint", str(checkpoint), "distill node")
    return validated(data)


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


def apply_config(base: Mapping[str, Any] | None, checkpoint: Path, quality_speed: float) -> tuple[dict[str, Any], list[str], list[str]]:
    """Config of the apply node: inference from `checkpoint`, readiness gates (the router's own), plus a
    `layers` gate that lets only the chosen best ready layers serve. Returns (config, chosen, ready)."""
    data = copy.deepcopy(dict(base)) if base else {"backend": "ttr"}
    name = _require_learned(data, "apply node")
    _set(data, "training", False, "apply node")
    _set(data, "checkpoint", str(checkpoint), "apply node")
    probe = Session(validated(data))
    try:
        backend = probe.learned_backends()[name]
        ready = sorted((k for k, r in backend.ready.items() if r), key=_layer_order)
        scores = layer_scores(probe, checkpoint)
    finally:
        probe.close()
    chosen = choose_layers(ready, scores, quality_speed)
    data.setdefault("gates", [])
    data["gates"] = list(data["gates"]) + [{"kind": "layers", "include": chosen}]
    if not ready:
        log.warning("attnplug: apply node: checkpoint %s has no ready %s layer; every call stays exact", checkpoint, name)
    log.info("attnplug: apply node: %d of %d ready layers may serve (quality_speed=%.2f)%s", len(chosen), len(ready),
             quality_speed, "" if scores else "; no EMA cosine distances found, ranked by layer order")
    return validated(data), chosen, ready


def schedule_config(base: Mapping[str, Any], exact_first: int, exact_last: int, backend: str, steps: str,
                    layers: str, otherwise: str) -> dict[str, Any]:
    """Append `schedule` gate rules: exact on the first/last steps, `backend` on `steps` × `layers`, and
    exact elsewhere when `otherwise == "exact"`. An existing schedule gate keeps its rules first."""
    data = copy.deepcopy(dict(base))
    exact = data.get("exact", "host")
    chosen = data.get("backend", "sdpa") if backend in ("", "(config)") else backend
    patterns = [p for p in layers.replace(",", " ").split() if p] or ["*"]
    rules: list[dict[str, Any]] = []
    if exact_first > 0:
        rules.append({"backend": exact, "steps": f":{exact_first}"})
    if exact_last > 0:
        rules.append({"backend": exact, "steps": f"-{exact_last}:"})
    rule: dict[str, Any] = {"backend": chosen, "layers": patterns}
    if steps.strip():
        rule["steps"] = steps.strip()
    rules.append(rule)
    if otherwise == "exact":
        rules.append({"backend": exact})
    gates = list(data.get("gates", []))
    for g in gates:
        if g.get("kind") == "schedule":
            g["rules"] = list(g.get("rules", [])) + rules
            break
    else:
        gates.append({"kind": "schedule", "rules": rules})
    data["gates"] = gates
    return validated(data)
