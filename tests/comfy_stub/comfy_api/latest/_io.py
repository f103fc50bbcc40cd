"""Stand-in of `comfy_api/latest/_io.py`: the V3 schema subset attnplug uses.

Same constructor keywords as upstream for `Input`/`WidgetInput`/`Output`, `Boolean`, `Int`, `Float`,
`String`, `Combo`, `Model`, `Custom(io_type)`; `Schema` is a dataclass with upstream's field names;
`NodeOutput(*args, ui=None, expand=None)`; `ComfyNode` with classmethods `define_schema`, `execute`.
`Schema.validate()` checks ids are unique (upstream) and — stricter, for attnplug's tests — that
every input has a tooltip. Left out: UI outputs, hidden inputs, lazy evaluation, async execute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Input:
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,  # noqa: A002
                 tooltip: str | None = None, lazy: bool | None = None, extra_dict: dict | None = None,
                 raw_link: bool | None = None, advanced: bool | None = None) -> None:
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict or {}

    @property
    def io_type(self) -> str:
        return self.Parent.io_type  # type: ignore[attr-defined]


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,  # noqa: A002
                 tooltip: str | None = None, lazy: bool | None = None, default: Any = None,
                 socketless: bool | None = None, widget_type: str | None = None, force_input: bool | None = None,
                 extra_dict: dict | None = None, raw_link: bool | None = None, advanced: bool | None = None) -> None:
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link, advanced)
        self.default = default
        self.force_input = force_input


class Output:
    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,  # noqa: A002
                 is_output_list: bool = False) -> None:
        self.id = id
        self.display_name = display_name or id
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    @property
    def io_type(self) -> str:
        return self.Parent.io_type  # type: ignore[attr-defined]


def _comfytype(io_type: str, input_cls: type = Input):
    """Build a ComfyType with its own Input/Output subclasses bound to `io_type` (upstream: `@comfytype`)."""
    ns: dict[str, Any] = {"io_type": io_type}
    cls = type(io_type.title(), (), ns)
    cls.Input = type("Input", (input_cls,), {"Parent": cls})  # type: ignore[attr-defined]
    cls.Output = type("Output", (Output,), {"Parent": cls})  # type: ignore[attr-defined]
    return cls


class _BooleanInput(WidgetInput):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,  # noqa: A002
                 lazy: bool | None = None, default: bool | None = None, label_on: str | None = None,
                 label_off: str | None = None, **kw: Any) -> None:
        super().__init__(id, display_name, optional, tooltip, lazy, default, **kw)


class _NumberInput(WidgetInput):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,  # noqa: A002
                 lazy: bool | None = None, default: float | int | None = None, min: float | None = None,  # noqa: A002
                 max: float | None = None, step: float | None = None, round: float | None = None,  # noqa: A002
                 control_after_generate: Any = None, display_mode: Any = None, **kw: Any) -> None:
        super().__init__(id, display_name, optional, tooltip, lazy, default, **kw)
        self.min, self.max, self.step = min, max, step


class _StringInput(WidgetInput):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,  # noqa: A002
                 lazy: bool | None = None, multiline: bool = False, placeholder: str | None = None,
                 default: str | None = None, dynamic_prompts: bool | None = None, **kw: Any) -> None:
        super().__init__(id, display_name, optional, tooltip, lazy, default, **kw)
        self.multiline = multiline


class _ComboInput(WidgetInput):
    def __init__(self, id: str, options: list[str] | type[Enum] | None = None, display_name: str | None = None,  # noqa: A002
                 optional: bool = False, tooltip: str | None = None, lazy: bool | None = None,
                 default: str | None = None, **kw: Any) -> None:
        if isinstance(options, type) and issubclass(options, Enum):
            options = [e.value for e in options]
        super().__init__(id, display_name, optional, tooltip, lazy, default, **kw)
        self.options = list(options or [])


Boolean = _comfytype("BOOLEAN", _BooleanInput)
Int = _comfytype("INT", _NumberInput)
Float = _comfytype("FLOAT", _NumberInput)
String = _comfytype("STRING", _StringInput)
Combo = _comfytype("COMBO", _ComboInput)
Model = _comfytype("MODEL")
Latent = _comfytype("LATENT")
Conditioning = _comfytype("CONDITIONING")


def Custom(io_type: str):  # noqa: N802, ANN201 - upstream name
    """A ComfyType for a custom io_type, with `.Input` and `.Output`."""
    return _comfytype(io_type)


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    hidden: list[Hidden] = field(default_factory=list)
    description: str = ""
    search_aliases: list[str] = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    not_idempotent: bool = False

    def validate(self) -> None:
        ids = [i.id for i in self.inputs] + [o.id for o in self.outputs if o.id is not None]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"Ids must be unique between inputs and outputs; duplicates: {sorted(dup)}")
        for i in self.inputs:
            if not i.tooltip:
                raise ValueError(f"{self.node_id}: input {i.id!r} has no tooltip")
        for i in self.inputs:
            if isinstance(i, _ComboInput) and i.default is not None and i.default not in i.options:
                raise ValueError(f"{self.node_id}: combo {i.id!r} default {i.default!r} not in {i.options}")


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: dict | None = None, block_execution: str | None = None) -> None:
        self.args = args
        self.ui = ui
        self.expand = expand

    @property
    def result(self) -> tuple | None:
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class ComfyNode:
    """Base of V3 nodes. `GET_SCHEMA` validates and returns the schema (upstream does the same)."""

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 - upstream name
        schema = cls.define_schema()
        schema.validate()
        return schema
