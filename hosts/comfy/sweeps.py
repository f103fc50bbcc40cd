"""Pure functions behind the utility nodes: seed batches, prompt lists, sweeps, combinations.

Values are items: `int`, `float` or `str` (a prompt). They come from a widget's text or from a
connected list; typed outputs convert them (`as_floats`, `as_ints`, `as_strings`) and say which item
does not convert. Text is read as: a JSON list (`[1, 2]`); one item per line when there are several
lines; else comma-separated; else space-separated when every part is a number; else one item.
Numbers in text become `int` or `float`, anything else stays text. No ComfyUI import: the nodes in
`nodes_utils.py` are thin wrappers, and these are tested directly.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Sequence, Union

Item = Union[int, float, str]
MAX_SEED = 2 ** 64


def random_seeds(seed: int, count: int) -> list[int]:
    """`count` seeds in [0, 2^64) drawn deterministically from `seed`."""
    if count < 1:
        raise ValueError(f"RandomSeedBatch: count must be >= 1, got {count}")
    rng = random.Random(seed)
    return [rng.randrange(MAX_SEED) for _ in range(count)]


def load_prompt_list(path: Path) -> list[str]:
    """The prompts of a JSON file that must hold exactly an `array<string>`; errors name file and index."""
    what = "LoadPromptListFromJSON"
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder; name a JSON file in it, e.g. prompts.json")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc} (relative names are looked up in "
                         "ComfyUI's input folder)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"{what}: {path} must hold a JSON array of strings, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise ValueError(f"{what}: {path}[{i}] must be a string, got {type(item).__name__} {json.dumps(item)[:40]}")
    if not data:
        raise ValueError(f"{what}: {path} holds an empty array; expected at least one prompt")
    return data


# ---- items -------------------------------------------------------------------------------------------------

def _number(text: str) -> int | float | None:
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _token(text: str) -> Item:
    number = _number(text)
    return text if number is None else number


def parse_text(text: str, what: str) -> list[Item]:
    """Items of a widget's text (rules in the module docstring); empty text gives no items."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what}: not a valid JSON list: {exc}") from None
        return parse_list(data if isinstance(data, list) else [data], what)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return [_token(line) for line in lines]
    if "," in text:
        return [_token(part.strip()) for part in text.split(",") if part.strip()]
    parts = text.split()
    if len(parts) > 1 and all(_number(p) is not None for p in parts):
        return [_token(p) for p in parts]
    return [_token(text)]


def parse_list(raw: Sequence[Any], what: str) -> list[Item]:
    """Items of a connected list, kept as they are (a tensor or nested lists are flattened)."""
    out: list[Item] = []
    for i, x in enumerate(raw):
        if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
            x = x.tolist()
        if isinstance(x, (list, tuple)):
            out.extend(parse_list(x, what))
        elif isinstance(x, bool) or not isinstance(x, (int, float, str)):
            raise ValueError(f"{what}: item {i} is a {type(x).__name__} ({x!r}); expected numbers or text")
        else:
            out.append(x)
    return out


def parse_items(raw: Any, what: str, linked: bool | None = None) -> list[Item]:
    """The items of an input: a connected list as it is (`linked=True`), a widget's text (`linked=False`);
    when not known, a one-element list holding text is taken for a widget (ComfyUI passes widgets that way)."""
    if hasattr(raw, "tolist") and not isinstance(raw, (str, bytes)):
        raw = raw.tolist()
    if isinstance(raw, str):
        return parse_text(raw, what)
    if not isinstance(raw, (list, tuple)):
        return parse_list([raw], what)
    if not linked and len(raw) == 1 and isinstance(raw[0], str):
        return parse_text(raw[0], what)
    return parse_list(raw, what)


def _bad(what: str, i: int, x: Item, expected: str) -> ValueError:
    return ValueError(f"{what}: item {i} ({x!r}) is not {expected}")


def as_floats(items: Sequence[Item], what: str) -> list[float]:
    out = []
    for i, x in enumerate(items):
        value = _number(x.strip()) if isinstance(x, str) else x
        if value is None:
            raise _bad(what, i, x, "a number")
        out.append(float(value))
    return out


def as_ints(items: Sequence[Item], what: str) -> list[int]:
    out = []
    for i, x in enumerate(items):
        value = _number(x.strip()) if isinstance(x, str) else x
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise _bad(what, i, x, "a whole number")
        out.append(value)
    return out


def as_strings(items: Sequence[Item], what: str) -> list[str]:
    return [x if isinstance(x, str) else str(x) for x in items]


CONVERT = {"FLOAT": as_floats, "INT": as_ints, "STRING": as_strings}


# ---- sweeps and combinations ----------------------------------------------------------------------------------

def clock_length(clock: Any, n_values: int, linked: bool | None = None) -> int:
    """Ticks of a clock: a connected list (prompts, seeds, numbers) has one tick per item; as text, a bare
    integer N means N ticks, empty text one tick per value, anything else one tick per item."""
    if linked:
        return len(parse_items(clock, "ClockedSweepValues clock", linked=True))
    if isinstance(clock, (list, tuple)) and len(clock) == 1 and isinstance(clock[0], str):
        clock = clock[0]
    if isinstance(clock, str):
        text = clock.strip()
        if not text:
            return n_values
        if re.fullmatch(r"\d+", text):
            return int(text)
    return len(parse_items(clock, "ClockedSweepValues clock", linked))


def clocked_sweep(values: Sequence[Item], ticks: int) -> list[Item]:
    """Spread `values` (m of them) over `ticks` ticks, m <= ticks: each value repeats ticks // m times and
    the first ticks % m values once more, in order."""
    m = len(values)
    if not m:
        raise ValueError("ClockedSweepValues: values is empty; give at least one value")
    if m > ticks:
        raise ValueError(f"ClockedSweepValues: {m} values do not fit a clock of {ticks} ticks; the clock needs at "
                         "least one tick per value")
    base, extra = divmod(ticks, m)
    out: list[Item] = []
    for i, v in enumerate(values):
        out.extend([v] * (base + (1 if i < extra else 0)))
    return out


def combinations(*lists: Sequence[Item] | None) -> list[list[Item]]:
    """The full Cartesian product of the given lists, one output list per input (None inputs give [])."""
    present = [i for i, vals in enumerate(lists) if vals is not None]
    if not present:
        raise ValueError("Combinations: give at least input a")
    for i in present:
        if len(lists[i]) == 0:  # type: ignore[arg-type]
            raise ValueError(f"Combinations: input {'abcd'[i] if i < 4 else i} is empty")
    rows = list(itertools.product(*(lists[i] for i in present)))  # type: ignore[misc]
    out: list[list[Item]] = [[] for _ in lists]
    for col, i in enumerate(present):
        out[i] = [row[col] for row in rows]
    return out


def prompt_lines(raw: Any, linked: bool | None) -> list[str]:
    """Prompts of an input: a connected list as it is; a widget's text one prompt per line (commas are
    part of prompts)."""
    if not linked and isinstance(raw, (list, tuple)) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if isinstance(raw, str):
        return [line.strip() for line in raw.splitlines() if line.strip()]
    return as_strings(parse_list(raw, "PromptSeedCombinations prompts"), "PromptSeedCombinations prompts")


def prompt_seed_combinations(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    """Every (prompt, seed) pair once, prompt by prompt: two lists of len(prompts) × len(seeds)."""
    if not prompts:
        raise ValueError("PromptSeedCombinations: prompts is empty; connect a prompt list or type one prompt per line")
    if not seeds:
        raise ValueError("PromptSeedCombinations: seeds is empty; connect RandomSeedBatch or give a seed")
    pairs = list(itertools.product(prompts, seeds))
    return [p for p, _ in pairs], [s for _, s in pairs]
