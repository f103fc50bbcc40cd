"""Stand-in of `comfy_api/latest/_io.py`: the V3 schema subset attnplug uses.

Same constructor keywords as upstream for `Input`/`WidgetInput`/`Output`, `Boolean`, `Int`, `Float`,
`String`, `Combo`, `Model`, `Latent`, `Conditioning`, `Vae`, `MultiType`, `Custom(io_type)`; `Schema` is a dataclass with upstream's field names;
`NodeOutput(*args, ui=None, expand=None)`; `ComfyNode` with classmethods `define_schema`, `execute`,
the optional `validate_inputs` / `fingerprint_inputs` (upstream's base raises NotImplementedError),
`hidden` (None until the executor fills it) and `PREPARE_CLASS_CLONE(hidden_inputs)`, which returns a
subclass whose `hidden` is a `HiddenHolder` (upstream clones the class the same way per execution).
`Schema.validate()` checks ids are unique (upstream) and — stricter, for attnplug's tests — that
every input has a tooltip. Left out: UI outputs, lazy evaluation, async execute, dynamic inputs.
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
        self.display_name = display_name  # upstream: the UI shows the io type when it is None
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
        self.control_after_generate = control_after_generate


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
Vae = _comfytype("VAE")


class MultiType:
    """An input that accepts several io types (upstream `COMFY_MULTITYPED_V3`): its io type is the types
    joined by commas; given an `Input` as `id`, that input's widget is used (with its tooltip, default...)."""

    io_type = "COMFY_MULTITYPED_V3"

    class Input(Input):
        def __init__(self, id: "str | Input", types: list, display_name: str | None = None,  # noqa: A002
                     optional: bool = False, tooltip: str | None = None, lazy: bool | None = None,
                     extra_dict: dict | None = None) -> None:
            self.input_override = None
            if isinstance(id, Input):
                self.input_override = id
                optional = id.optional if id.optional is True else optional
                tooltip = id.tooltip if id.tooltip is not None else tooltip
                display_name = id.display_name if id.display_name is not None else display_name
                id = id.id
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
            self._io_types = types

        @property
        def io_type(self) -> str:
            names = [t.io_type for t in self._io_types]
            if self.input_override is not None:
                names.insert(0, self.input_override.io_type)
            return ",".join(dict.fromkeys(names))


def Custom(io_type: str):  # noqa: N802, ANN201 - upstream name
    """A ComfyType for a custom io_type, with `.Input` and `.Output`."""
    return _comfytype(io_type)


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    """The hidden values of one execution; a value that was not provided reads as None (as upstream)."""

    def __init__(self, unique_id: str | None = None, prompt: Any = None, extra_pnginfo: Any = None,
                 dynprompt: Any = None, auth_token_comfy_org: str | None = None,
                 api_key_comfy_org: str | None = None, **kwargs: Any) -> None:
        self.unique_id = unique_id
        self.prompt = prompt
        self.extra_pnginfo = extra_pnginfo
        self.dynprompt = dynprompt
        self.auth_token_comfy_org = auth_token_comfy_org
        self.api_key_comfy_org = api_key_comfy_org

    def __getattr__(self, key: str) -> Any:
        return None

    @classmethod
    def from_dict(cls, d: dict | None) -> "HiddenHolder":
        d = d or {}
        return cls(**{h.name: d.get(h) for h in Hidden})


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

    hidden: HiddenHolder | None = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        """Upstream: True, or a message ComfyUI shows as the node's validation error; inputs this method
        names skip ComfyUI's own checks (min/max, combo options)."""
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        """Upstream: part of the node's cache key (V1's IS_CHANGED); another value re-executes the node."""
        raise NotImplementedError

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs: dict) -> type["ComfyNode"]:  # noqa: N802 - upstream name
        clone = type(cls.__name__, (cls,), {})
        clone.hidden = HiddenHolder.from_dict(hidden_inputs)
        return clone

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 - upstream name
        schema = cls.define_schema()
        schema.validate()
        return schema
