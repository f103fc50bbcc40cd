"""Stand-in of ComfyUI's `execution.py`: how an API-format prompt runs its nodes, lists included.

Kept from upstream (`get_input_data`, `_map_node_over_list`, `get_output_data`, `validate_inputs`):
- a linked input `[node_id, slot]` receives that node's whole output list; a widget value `v` is `[v]`;
  hidden inputs the schema asks for (`UNIQUE_ID`, `PROMPT`) reach the node through `cls.hidden` of a
  per-execution class clone;
- a node with `is_input_list` is called once with every input as a list; otherwise it is called once per
  index up to the longest input, a shorter input repeating its last item (`v[i if len(v) > i else -1]`,
  which raises IndexError on an empty list), with no arguments when it has no inputs;
- results are merged per output: an `is_output_list` output concatenates the calls' lists, any other
  output collects one value per call;
- before running, a node that overrides `validate_inputs` gets the widget values of the inputs its
  signature names (all of them with `**kwargs`); anything but True fails the prompt with its message.
Left out: caching, lazy inputs, node expansion, async nodes, output nodes deciding what runs (every
node of the prompt runs once, in dependency order).
"""
from __future__ import annotations

import inspect
from typing import Any

from comfy_api.latest import io


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name).__func__ is not getattr(io.ComfyNode, name).__func__


def _validate(cls: type[io.ComfyNode], node_id: str, inputs: dict[str, Any]) -> None:
    if not _overrides(cls, "validate_inputs"):
        return
    spec = inspect.getfullargspec(cls.validate_inputs)
    names = set(spec.args[1:]) | (set(inputs) if spec.varkw else set())
    widgets = {k: v for k, v in inputs.items() if k in names and not is_link(v)}
    result = cls.validate_inputs(**widgets)
    if result is not True:
        raise ValueError(f"Custom validation failed for node {node_id}: {result}")


def map_node_over_list(cls: type[io.ComfyNode], data: dict[str, list[Any]], input_is_list: bool) -> list[tuple]:
    if input_is_list:
        return [tuple(cls.execute(**data).args)]
    longest = max((len(v) for v in data.values()), default=0)
    if longest == 0:
        return [tuple(cls.execute().args)]
    return [tuple(cls.execute(**{k: v[i if len(v) > i else -1] for k, v in data.items()}).args)
            for i in range(longest)]


def run_prompt(prompt: dict[str, dict[str, Any]], nodes: dict[str, type[io.ComfyNode]]) -> dict[str, list[list[Any]]]:
    """Validate and run every node of `prompt` once; returns each node's outputs (one list per output)."""
    outputs: dict[str, list[list[Any]]] = {}
    for node_id, node in prompt.items():
        _validate(nodes[node["class_type"]], node_id, node["inputs"])

    def run(node_id: str) -> list[list[Any]]:
        if node_id in outputs:
            return outputs[node_id]
        node = prompt[node_id]
        cls = nodes[node["class_type"]]
        schema = cls.GET_SCHEMA()
        data = {name: (run(value[0])[value[1]] if is_link(value) else [value])
                for name, value in node["inputs"].items()}
        hidden = {h: {io.Hidden.unique_id: node_id, io.Hidden.prompt: prompt}.get(h) for h in schema.hidden}
        results = map_node_over_list(cls.PREPARE_CLASS_CLONE(hidden), data, schema.is_input_list)
        merged = []
        for i, out in enumerate(schema.outputs):
            merged.append([x for r in results for x in r[i]] if out.is_output_list else [r[i] for r in results])
        outputs[node_id] = merged
        return merged

    for node_id in prompt:
        run(node_id)
    return outputs
