"""Utility V3 nodes for batches of prompts, seeds and values: RandomSeedBatch, LoadPromptListFromJSON,
PromptSeedCombinations, ClockedSweepValues, Combinations.

ComfyUI pairs list inputs by index (a shorter list repeats its last item), it does not combine them:
a prompt list and a seed list into one KSampler give max(P, S) images, not P × S.
PromptSeedCombinations makes every (prompt, seed) pair; Combinations does the same for any values.

Sweep and combination outputs come typed three ways — FLOAT, INT, STRING — so they can drive cfg,
steps or seeds, and prompts. An output whose values do not convert (a prompt on the INT output) is an
error only when something is connected to it; the node reads that from the prompt ComfyUI runs (the
hidden inputs PROMPT and UNIQUE_ID), and also which of its inputs are links (a connected list is taken
as it is; a widget's text is split into items). Node ids are prefixed `Attnplug` so they do not clash
with other packs; display names are the familiar ones. Logic in `sweeps.py`.
"""
from __future__ import annotations

from typing import Any, Sequence

from comfy_api.latest import io

from . import files, sweeps

CATEGORY = "attnplug/utils"
KINDS = (("float", "FLOAT", io.Float), ("int", "INT", io.Int), ("string", "STRING", io.String))
HIDDEN = [io.Hidden.unique_id, io.Hidden.prompt]
TEXT_RULES = ("a JSON list, one value per line, values separated by commas, or numbers separated by spaces; "
              "or a connected list (prompts, seeds, numbers)")


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) \
        and isinstance(value[1], int) and not isinstance(value[1], bool)


def _links(cls: type[io.ComfyNode]) -> tuple[set[str] | None, set[int] | None]:
    """(names of this node's linked inputs, indices of its connected outputs) in the prompt being run;
    (None, None) when ComfyUI did not pass the prompt (e.g. the node called directly)."""
    hidden = getattr(cls, "hidden", None)
    uid, prompt = getattr(hidden, "unique_id", None), getattr(hidden, "prompt", None)
    if uid is None or not isinstance(prompt, dict):
        return None, None
    uid = str(uid)
    own = (prompt.get(uid) or {}).get("inputs") or {}
    linked = {name for name, value in own.items() if _is_link(value)}
    connected = {value[1] for node in prompt.values() if isinstance(node, dict)
                 for value in (node.get("inputs") or {}).values() if _is_link(value) and str(value[0]) == uid}
    return linked, connected


def _linked(linked: set[str] | None, name: str) -> bool | None:
    return None if linked is None else name in linked


def _typed_outputs(node: str, columns: Sequence[tuple[str, list[sweeps.Item] | None, str, str]],
                   connected: set[int] | None) -> list[list[Any]]:
    """One list per output from `(output name, items, io type, what the items are)`. An output that cannot
    be made (empty items, values that do not convert) raises when it is connected, else stays empty."""
    values: list[list[Any]] = []
    for slot, (name, items, kind, source) in enumerate(columns):
        used = connected is not None and slot in connected
        if not items:
            if used:
                raise ValueError(f"{node}: output {name!r} is connected, but {source} is empty")
            values.append([])
            continue
        try:
            values.append(sweeps.CONVERT[kind](items, f"{node}: output {name!r} ({kind})"))
        except ValueError:
            if used:
                raise
            values.append([])  # nothing reads it
    return values


def _value_input(name: str, tooltip: str, optional: bool = False) -> io.MultiType.Input:
    """A text widget that also takes a connected list of numbers or text."""
    return io.MultiType.Input(io.String.Input(name, multiline=True, default="", optional=optional, tooltip=tooltip),
                              types=[io.String, io.Int, io.Float])


def _typed_output_specs(prefix: str, what: str) -> list[Any]:
    return [cls.Output(f"{prefix}{suffix}", display_name=f"{prefix}{suffix}", tooltip=f"{what} as {kind}.",
                       is_output_list=True)
            for suffix, kind, cls in KINDS]


class RandomSeedBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugRandomSeedBatch", display_name="RandomSeedBatch", category=CATEGORY,
            description="A deterministic list of random seeds (one per downstream execution).",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2 ** 64 - 1, control_after_generate=True,
                                 tooltip="Seed of the seed list; 'randomize' after each queue gives every queued "
                                         "run new seeds (a fixed seed repeats the same batch)."),
                    io.Int.Input("count", default=8, min=1, max=4096, tooltip="How many seeds to emit.")],
            outputs=[io.Int.Output("seeds", display_name="seeds", tooltip="Seeds in [0, 2^64).", is_output_list=True)],
        )

    @classmethod
    def execute(cls, seed: int, count: int) -> io.NodeOutput:
        return io.NodeOutput(sweeps.random_seeds(seed, count))


class LoadPromptListFromJSON(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugLoadPromptListFromJSON", display_name="LoadPromptListFromJSON", category=CATEGORY,
            description="Prompts from a JSON file holding exactly an array of strings.",
            inputs=[io.String.Input("json_path", default="prompts.json", tooltip="A JSON file [\"prompt 1\", "
                                    "\"prompt 2\", ...]: a name in ComfyUI's input folder ('name [output]' for the "
                                    "output folder), or an absolute path. Anything else is an error naming the file "
                                    "and the offending item.")],
            outputs=[io.String.Output("prompts", display_name="prompts", tooltip="One prompt per downstream execution.",
                                      is_output_list=True)],
        )

    @classmethod
    def fingerprint_inputs(cls, json_path: str = "", **kwargs: Any) -> Any:
        """The file's identity, size and mtime: an edited prompt file is read again."""
        try:
            return files.fingerprint(files.input_file(json_path, "json_path"))
        except ValueError:
            return (json_path,)

    @classmethod
    def execute(cls, json_path: str) -> io.NodeOutput:
        return io.NodeOutput(sweeps.load_prompt_list(files.input_file(json_path, "LoadPromptListFromJSON: json_path")))


class PromptSeedCombinations(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugPromptSeedCombinations", display_name="PromptSeedCombinations", category=CATEGORY,
            description="Every prompt with every seed: P prompts and S seeds give P × S (prompt, seed) pairs, prompt "
                        "by prompt. (Connecting a prompt list and a seed list straight into a sampler pairs them by "
                        "index instead.)",
            inputs=[io.String.Input("prompts", multiline=True, default="", tooltip="Prompts: connect "
                                    "LoadPromptListFromJSON, or type one prompt per line."),
                    io.Int.Input("seeds", default=0, min=0, max=2 ** 64 - 1, control_after_generate=False,
                                 tooltip="Seeds: connect RandomSeedBatch, or give one seed.")],
            outputs=[io.String.Output("prompt", display_name="prompt", tooltip="The prompt of each pair.",
                                      is_output_list=True),
                     io.Int.Output("seed", display_name="seed", tooltip="The seed of each pair.", is_output_list=True)],
            is_input_list=True, hidden=HIDDEN,
        )

    @classmethod
    def execute(cls, prompts: Any, seeds: Any) -> io.NodeOutput:
        linked, _ = _links(cls)
        what = "PromptSeedCombinations seeds"
        seed_list = sweeps.as_ints(sweeps.parse_items(seeds, what, _linked(linked, "seeds")), what)
        return io.NodeOutput(*sweeps.prompt_seed_combinations(sweeps.prompt_lines(prompts, _linked(linked, "prompts")),
                                                              seed_list))


class ClockedSweepValues(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugClockedSweepValues", display_name="ClockedSweepValues", category=CATEGORY,
            description="Spreads m values evenly over a clock of n ticks (m <= n): each value repeats n // m times, "
                        "the first n % m once more. Connect the clock to the list the sweep runs along (prompts, "
                        "seeds) to vary a value across it.",
            inputs=[_value_input("clock", "The clock: a connected list (prompts, seeds, numbers: one tick per item), "
                                 "a bare integer N for N ticks, any other list of values, or empty for one tick per "
                                 "value."),
                    _value_input("values", f"Values to sweep: {TEXT_RULES}.")],
            outputs=_typed_output_specs("values_", "n values, one per tick,"),
            is_input_list=True, hidden=HIDDEN,
        )

    @classmethod
    def execute(cls, clock: Any, values: Any) -> io.NodeOutput:
        linked, connected = _links(cls)
        items = sweeps.parse_items(values, "ClockedSweepValues values", _linked(linked, "values"))
        ticks = sweeps.clock_length(clock, len(items), _linked(linked, "clock"))
        swept = sweeps.clocked_sweep(items, ticks)
        return io.NodeOutput(*_typed_outputs("ClockedSweepValues", [(f"values_{s}", swept, kind, "values")
                                                                     for s, kind, _ in KINDS], connected))


class Combinations(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugCombinations", display_name="Combinations", category=CATEGORY,
            description="Every combination of the inputs (full Cartesian product, any lengths): the outputs of input "
                        "x hold x's value in each combination, in itertools.product order, as FLOAT, INT and STRING.",
            inputs=[_value_input(x, f"Values of {x}: {TEXT_RULES}." + (" Required." if x == "a" else " Optional."),
                                 optional=x != "a") for x in "abcd"],
            outputs=[o for x in "abcd" for o in _typed_output_specs(f"{x}_", f"Input {x}'s value per combination")],
            is_input_list=True, hidden=HIDDEN,
        )

    @classmethod
    def execute(cls, a: Any, b: Any = None, c: Any = None, d: Any = None) -> io.NodeOutput:
        linked, connected = _links(cls)
        lists: list[list[sweeps.Item] | None] = []
        for name, raw in zip("abcd", (a, b, c, d)):
            vals = None if raw is None else sweeps.parse_items(raw, f"Combinations {name}", _linked(linked, name))
            lists.append(vals or None)  # an empty optional widget counts as not given
        if not lists[0]:
            raise ValueError("Combinations: input a is empty; give at least one value")
        combos = sweeps.combinations(*lists)
        columns = [(f"{x}_{s}", combos[i], kind, f"input {x}") for i, x in enumerate("abcd") for s, kind, _ in KINDS]
        return io.NodeOutput(*_typed_outputs("Combinations", columns, connected))


NODES: list[type[io.ComfyNode]] = [RandomSeedBatch, LoadPromptListFromJSON, PromptSeedCombinations, ClockedSweepValues,
                                   Combinations]
