"""Utility V3 nodes the seed pack had: RandomSeedBatch, LoadPromptListFromJSON, ClockedSweepValues,
Combinations (full Cartesian product). Logic in `sweeps.py`; node ids are prefixed `Attnplug` so they
do not clash with other packs, display names are the familiar ones."""
from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from . import sweeps

CATEGORY = "attnplug/utils"


def _first(value: Any) -> Any:
    """A scalar widget value under `is_input_list=True` arrives as a one-element list."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


class RandomSeedBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugRandomSeedBatch", display_name="RandomSeedBatch", category=CATEGORY,
            description="A deterministic list of random seeds (one per downstream execution).",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2 ** 64 - 1, tooltip="Seed of the seed list."),
                    io.Int.Input("count", default=8, min=1, max=4096, tooltip="How many seeds to emit.")],
            outputs=[io.Int.Output("seeds", tooltip="Seeds in [0, 2^64).", is_output_list=True)],
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
            inputs=[io.String.Input("json_path", default="", tooltip="Path of a JSON file: [\"prompt 1\", \"prompt 2\", ...]; "
                                    "anything else is an error naming the file and the offending item.")],
            outputs=[io.String.Output("prompts", tooltip="One prompt per downstream execution.", is_output_list=True)],
        )

    @classmethod
    def execute(cls, json_path: str) -> io.NodeOutput:
        return io.NodeOutput(sweeps.load_prompt_list(json_path))


class ClockedSweepValues(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttnplugClockedSweepValues", display_name="ClockedSweepValues", category=CATEGORY,
            description="Spreads m values evenly over a clock of n ticks (m <= n): each value repeats n // m times, "
                        "the first n % m once more.",
            inputs=[io.String.Input("clock", multiline=True, default="", tooltip="The clock: a list (text, JSON or a "
                                    "connected list), a bare integer N for 1..N, or empty for one tick per value."),
                    io.String.Input("values", multiline=True, default="", tooltip="Values to sweep: numbers separated "
                                    "by commas/spaces/newlines, a JSON list, or a connected list.")],
            outputs=[io.Float.Output("swept", display_name="values", tooltip="n values, one per tick.", is_output_list=True)],
            is_input_list=True,
        )

    @classmethod
    def execute(cls, clock: Any, values: Any) -> io.NodeOutput:
        return io.NodeOutput(sweeps.clocked_sweep(clock, values))


class Combinations(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        tip = ("Values: numbers separated by commas/spaces/newlines, a JSON list, or a connected list.")
        return io.Schema(
            node_id="AttnplugCombinations", display_name="Combinations", category=CATEGORY,
            description="Every combination of the inputs (full Cartesian product, any lengths): output i holds "
                        "input i's value in each combination, in itertools.product order.",
            inputs=[io.String.Input("a", multiline=True, default="", tooltip=tip + " Required."),
                    io.String.Input("b", multiline=True, default="", optional=True, tooltip=tip + " Optional."),
                    io.String.Input("c", multiline=True, default="", optional=True, tooltip=tip + " Optional."),
                    io.String.Input("d", multiline=True, default="", optional=True, tooltip=tip + " Optional.")],
            outputs=[io.Float.Output(f"{x}_out", tooltip=f"Input {x}'s value per combination (empty when {x} is "
                                     "not given).", is_output_list=True) for x in "abcd"],
            is_input_list=True,
        )

    @classmethod
    def execute(cls, a: Any, b: Any = None, c: Any = None, d: Any = None) -> io.NodeOutput:
        lists = []
        for name, raw in zip("abcd", (a, b, c, d)):
            vals = None if raw is None else sweeps.parse_values(raw, f"Combinations {name}")
            if name != "a" and vals is not None and not vals:
                vals = None  # an empty optional widget counts as not given
            lists.append(vals)
        if not lists[0]:
            raise ValueError("Combinations: input a is empty; give at least one value")
        return io.NodeOutput(*sweeps.combinations(*lists))


NODES: list[type[io.ComfyNode]] = [RandomSeedBatch, LoadPromptListFromJSON, ClockedSweepValues, Combinations]
