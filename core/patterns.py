"""Layer patterns and step ranges as users write them in configs.

Layer patterns: `"single:*"`, `"double:0"`, `"single:3-5"` (inclusive index range), `"*"`, or any
fnmatch pattern on the layer key. Step ranges: `"0-1"`, `"3"`, `"-2:"` (the last two steps),
`":2"` (the first two), `"5:"` (from step 5 on).
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

_RANGE = re.compile(r"^(?P<type>[A-Za-z_]+):(?P<lo>\d+)-(?P<hi>\d+)$")


def validate_layer_pattern(pattern: str) -> str:
    """Return `pattern` if well-formed, else raise ValueError saying what is expected."""
    m = _RANGE.match(pattern)
    if m and int(m["lo"]) > int(m["hi"]):
        raise ValueError(f"layer pattern {pattern!r}: range start {m['lo']} is after its end {m['hi']}")
    if not pattern or pattern.strip() != pattern:
        raise ValueError(f"layer pattern {pattern!r}: expected e.g. 'single:*', 'double:0', 'single:3-5', '*'")
    return pattern


def layer_matches(pattern: str, layer_key: str) -> bool:
    """Whether `layer_key` (e.g. `"single:4"`) matches `pattern`."""
    m = _RANGE.match(pattern)
    if m:
        kind, _, idx = layer_key.partition(":")
        return kind == m["type"] and idx.isdigit() and int(m["lo"]) <= int(idx) <= int(m["hi"])
    return fnmatch.fnmatchcase(layer_key, pattern)


def any_layer_matches(patterns: list[str], layer_key: str) -> bool:
    return any(layer_matches(p, layer_key) for p in patterns)


def validate_step_range(spec: str) -> str:
    """Return `spec` if it is a step range this module understands, else raise ValueError."""
    try:
        _parse_steps(spec)
    except ValueError:
        raise ValueError(f"step range {spec!r}: expected 'N', 'A-B', ':N' (first N), '-N:' (last N) "
                         "or 'A:' (from A on)") from None
    return spec


def _parse_steps(spec: str) -> tuple[str, int, int]:
    s = spec.strip()
    if re.fullmatch(r"\d+", s):
        return ("abs", int(s), int(s))
    if m := re.fullmatch(r"(\d+)-(\d+)", s):
        lo, hi = int(m[1]), int(m[2])
        if lo > hi:
            raise ValueError(spec)
        return ("abs", lo, hi)
    if m := re.fullmatch(r":(\d+)", s):
        return ("first", int(m[1]), 0)
    if m := re.fullmatch(r"-(\d+):", s):
        return ("last", int(m[1]), 0)
    if m := re.fullmatch(r"(\d+):", s):
        return ("from", int(m[1]), 0)
    raise ValueError(spec)


def step_in_range(spec: str, step_index: int | None, num_steps: int | None) -> bool | None:
    """Whether `step_index` is in the range; None when unknowable (no step, or 'last N' without a total)."""
    if step_index is None:
        return None
    kind, a, b = _parse_steps(spec)
    if kind == "abs":
        return a <= step_index <= b
    if kind == "first":
        return step_index < a
    if kind == "from":
        return step_index >= a
    if num_steps is None:
        return None
    return step_index >= num_steps - a


def collapse_layer_keys(layer_keys: Iterable[str]) -> list[str]:
    """`['single:2', 'single:0', 'single:1', 'double:4']` → `['double:4', 'single:0-2']`: block kinds sorted,
    consecutive indices collapsed into ranges, keys without an index sorted after them."""
    groups: dict[str, list[int]] = {}
    others: list[str] = []
    for key in layer_keys:
        kind, sep, idx = key.partition(":")
        if sep and idx.isdigit():
            groups.setdefault(kind, []).append(int(idx))
        else:
            others.append(key)
    parts: list[str] = []
    for kind in sorted(groups):
        idxs = sorted(set(groups[kind]))
        start = prev = idxs[0]
        for i in idxs[1:] + [None]:  # type: ignore[list-item]
            if i is not None and i == prev + 1:
                prev = i
                continue
            parts.append(f"{kind}:{start}" if start == prev else f"{kind}:{start}-{prev}")
            if i is not None:
                start = prev = i
    return parts + sorted(others)


def describe_layers(layer_keys: "list[str] | tuple[str, ...]", limit: int = 12) -> str:
    """A short list of layer keys for messages: `double:0-1, single:0-5` (consecutive indices collapsed)."""
    parts = collapse_layer_keys(layer_keys)
    shown = ", ".join(parts[:limit])
    return shown + (f", … ({len(parts) - limit} more)" if len(parts) > limit else "") if parts else "none"
