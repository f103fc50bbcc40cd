"""Config building behind the nodes: plain attnplug config dicts in, validated copies out.

The `ATTNPLUG_CONFIG` socket carries a plain config dict. Nodes never mutate the dict they receive
(ComfyUI caches node outputs); each returns a deep copy with its changes. When a node's widget
overrides a value the incoming config set explicitly, it says so in the log (never silently).
Errors name where the bad value came from: the config file, or the node that set it.
No ComfyUI import here (files.py finds config files in ComfyUI's input folder).
"""
from __future__ import annotations

import copy
import difflib
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ...core import get_plugins
from ...core.config import read_config_file, validate_config
from ...core.patterns import validate_layer_pattern
from .files import input_file

log = logging.getLogger("attnplug")

#: the block types ComfyUI's Flux-family models report in `transformer_options["block_type"]`
BLOCK_TYPES = ("double", "single")


def validated(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate a config dict (raises `ConfigError` naming `source`, section and field); returns a deep copy."""
    validate_config(dict(data), source)
    return copy.deepcopy(dict(data))


def build_config(config_path: str, backend: str, exact: str, strict: bool, seed: int, extra_toml: str) -> dict[str, Any]:
    """The config node: a file when `config_path` is set (relative names in ComfyUI's input folder;
    widgets ignored, logged), else the widgets plus an optional TOML fragment merged on top."""
    if config_path.strip():
        path = input_file(config_path, "attnplug Config node: config_path")
        data = read_config_file(path)
        log.info("attnplug: config node uses %s; its widgets (backend, exact, strict, seed, extra) are ignored", path)
        return validated(data, str(path))
    data: dict[str, Any] = {"backend": backend, "exact": exact, "strict": strict, "seed": seed}
    if extra_toml.strip():
        try:
            extra = tomllib.loads(extra_toml)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"attnplug Config node: extra_toml is not valid TOML: {exc}") from None
        data = _merge(data, extra)
    return validated(data, "attnplug Config node (widgets and extra_toml)")


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_field(data: dict[str, Any], key: str, value: Any, node: str) -> None:
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


def require_learned(data: dict[str, Any], node: str) -> str:
    """The config's backend, which must be a learned one (ValueError naming the registered ones otherwise)."""
    name = data.get("backend", "sdpa")
    learned = learned_backends()
    if name not in learned:
        raise ValueError(f"attnplug {node}: config backend {name!r} is not a learned backend; this node needs one "
                         f"of {learned or '(none registered — is the ttr plugin installed?)'}")
    return name


def distill_config(base: Mapping[str, Any] | None, checkpoint: Path, distiller: str, mode: str) -> dict[str, Any]:
    """Config of the distill node: training on, the chosen distiller and checkpoint."""
    data = copy.deepcopy(dict(base)) if base else {"backend": "ttr"}
    require_learned(data, "distill node")
    if distiller not in registered_distillers():
        raise ValueError(f"attnplug distill node: distiller {distiller!r} is not registered; registered: "
                         f"{registered_distillers() or '(none)'}")
    set_field(data, "training", True, "distill node")
    set_field(data, "distiller", distiller, "distill node")
    set_field(data, "mode", mode, "distill node")
    set_field(data, "checkpoint", str(checkpoint), "distill node")
    return validated(data, "attnplug Distill node")


def schedule_config(base: Mapping[str, Any], exact_first: int, exact_last: int, backend: str, steps: str,
                    layers: str, otherwise: str) -> dict[str, Any]:
    """Append `schedule` gate rules: exact on the first/last steps, `backend` on `steps` × `layers`, and
    exact elsewhere when `otherwise == "exact"`. An existing schedule gate keeps its rules first."""
    data = copy.deepcopy(dict(base))
    exact = data.get("exact", "host")
    chosen = data.get("backend", "sdpa") if backend in ("", "(config)") else backend
    patterns = [comfy_layer_pattern(p) for p in layers.replace(",", " ").split() if p] or ["*"]
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
    return validated(data, "attnplug Schedule node")


def comfy_layer_pattern(pattern: str) -> str:
    """A layer pattern of the Schedule node, checked against the layer keys ComfyUI reports
    (`<block type>:<index>`): a typo such as `singel:*` is an error naming the known block types."""
    validate_layer_pattern(pattern)
    expected = "expected e.g. 'single:*', 'double:0', 'single:3-20' or '*'"
    if pattern in ("*", "*:*"):
        return pattern
    kind, sep, index = pattern.partition(":")
    if not sep:
        raise ValueError(f"attnplug Schedule node: layer pattern {pattern!r} names no block index; {expected}")
    if not any(c in kind for c in "*?[") and kind not in BLOCK_TYPES:
        close = difflib.get_close_matches(kind, BLOCK_TYPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"attnplug Schedule node: layer pattern {pattern!r}: unknown block type {kind!r}{hint}; "
                         f"ComfyUI's Flux models have the block types {', '.join(BLOCK_TYPES)}; {expected}")
    if not index or any(c.isalpha() for c in index):
        raise ValueError(f"attnplug Schedule node: layer pattern {pattern!r}: the block index must be a number, "
                         f"a range A-B or '*'; {expected}")
    return pattern
