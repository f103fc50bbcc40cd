"""Pure functions behind the utility nodes (seed batches, prompt lists, sweeps, combinations).

No ComfyUI import: the nodes in `nodes_utils.py` are thin wrappers, and these are tested directly.
"""
from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

MAX_SEED = 2 ** 64


def random_seeds(seed: int, count: int) -> list[int]:
    """`count` seeds in [0, 2^64) drawn deterministically from `seed`."""
    if count < 1:
        raise ValueError(f"RandomSeedBatch: count must be >= 1, got {count}")
    rng = random.Random(seed)
    return [rng.randrange(MAX_SEED) for _ in range(count)]


def load_prompt_list(path: str | Path) -> list[str]:
    """The prompts of a JSON file that must hold exactly an `array<string>`; errors name file and index."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"LoadPromptListFromJSON: cannot read {p}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"LoadPromptListFromJSON: {p} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"LoadPromptListFromJSON: {p} must hold a JSON array of strings, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise ValueError(f"LoadPromptListFromJSON: {p}[{i}] must be a string, got {type(item).__name__} "
                             f"{json.dumps(item)[:40]}")
    if not data:
        raise ValueError(f"LoadPromptListFromJSON: {p} holds an empty array; expected at least one prompt")
    return data


def parse_values(raw: Any, what: str) -> list[float]:
    """Numbers from a widget or a connected list: a list/tuple/tensor of numbers, a JSON list, or a
    comma/space/newline-separated string. An empty string gives an empty list."""
    if hasattr(raw, "tolist") and not isinstance(raw, (str, bytes)):
        raw = raw.tolist()
    if isinstance(raw, (list, tuple)):
        if len(raw) == 1 and isinstance(raw[0], str):  # a widget value under INPUT_IS_LIST
            return parse_values(raw[0], what)
        out = []
        for i, x in enumerate(raw):
            if isinstance(x, (list, tuple)):
                out.extend(parse_values(x, what))
                continue
            try:
                out.append(float(x))
            except (TypeError, ValueError):
                raise ValueError(f"{what}: item {i} ({x!r}) is not a number") from None
        return out
    if isinstance(raw, (int, float)):
        return [float(raw)]
    if not isinstance(raw, str):
        raise ValueError(f"{what}: expected numbers as text or a list, got {type(raw).__name__}")
    text = raw.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            return parse_values(json.loads(text), what)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what}: not a valid JSON list: {exc}") from None
    parts = [p for p in re.split(r"[,\s]+", text) if p]
    out = []
    for p in parts:
        try:
            out.append(float(p))
        except ValueError:
            raise ValueError(f"{what}: {p!r} is not a number") from None
    return out


def parse_clock(raw: Any, n_values: int) -> int:
    """The clock's length: a bare integer N means 1..N, empty means one tick per value, else the list's length."""
    if isinstance(raw, (list, tuple)) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            return n_values
        if re.fullmatch(r"\d+", text):
            return int(text)
    return len(parse_values(raw, "ClockedSweepValues clock"))


def clocked_sweep(clock: Any, values: Any) -> list[float]:
    """Spread `values` (m of them) over a clock of n ticks, m <= n: each value repeats n // m times and the
    first n % m values once more, in order."""
    vals = parse_values(values, "ClockedSweepValues values")
    if not vals:
        raise ValueError("ClockedSweepValues: values is empty; give at least one number")
    n = parse_clock(clock, len(vals))
    m = len(vals)
    if m > n:
        raise ValueError(f"ClockedSweepValues: {m} values do not fit a clock of {n} ticks (need values <= clock)")
    base, extra = divmod(n, m)
    out: list[float] = []
    for i, v in enumerate(vals):
        out.extend([v] * (base + (1 if i < extra else 0)))
    return out


def combinations(*lists: Sequence[float] | None) -> list[list[float]]:
    """The full Cartesian product of the given lists, one output list per input (None inputs give [])."""
    present = [i for i, vals in enumerate(lists) if vals is not None]
    if not present:
        raise ValueError("Combinations: give at least input a")
    for i in present:
        if len(lists[i]) == 0:  # type: ignore[arg-type]
            raise ValueError(f"Combinations: input {'abcd'[i] if i < 4 else i} is empty")
    rows = list(itertools.product(*(lists[i] for i in present)))  # type: ignore[misc]
    out: list[list[float]] = [[] for _ in lists]
    for col, i in enumerate(present):
        out[i] = [row[col] for row in rows]
    return out
