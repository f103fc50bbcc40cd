"""What attnplug knows about each diffusers transformer family: block names, token order, timestep scale.

The table is keyed by the transformer's class name so that this module does not import diffusers.
A model that is not in the table still works through the generic wrapper (any processor that calls
`dispatch_attention_fn`); it then gets block types from the usual diffusers module names and no
conditioning split unless the caller declares the token order (`apply(..., text_first=True)`),
because attnplug never guesses where the text tokens are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelLayout:
    """Facts about one transformer family.

    Attributes:
        text_first: the joint sequence the processor attends over is [text, image] (True),
            [image, text] (False), or unknown (None: no conditioning split is reported).
        timestep_divisor: sigma = timestep passed to `transformer.forward` / this; None when unknown.
        single_stream_text: single-stream blocks see [text, image] joined, and the text length is
            taken from the transformer's `encoder_hidden_states` (Flux, Flux2).
    """

    text_first: bool | None
    timestep_divisor: float | None
    single_stream_text: bool = False


#: Transformer class name → layout. Flux-style pipelines pass `timestep = t / 1000`, i.e. sigma;
#: SD3 passes t itself (sigma × 1000).
LAYOUTS: dict[str, ModelLayout] = {
    "FluxTransformer2DModel": ModelLayout(text_first=True, timestep_divisor=1.0, single_stream_text=True),
    "Flux2Transformer2DModel": ModelLayout(text_first=True, timestep_divisor=1.0, single_stream_text=True),
    "QwenImageTransformer2DModel": ModelLayout(text_first=True, timestep_divisor=1.0),
    "SD3Transformer2DModel": ModelLayout(text_first=False, timestep_divisor=1000.0),
}

GENERIC = ModelLayout(text_first=None, timestep_divisor=None)

_BLOCK_TYPES = {"transformer_blocks": "double", "single_transformer_blocks": "single"}
_PATH = re.compile(r"^(?P<blocks>[A-Za-z_]+)\.(?P<index>\d+)\.(?P<attn>[A-Za-z_0-9.]+)$")


def layout_for(
    transformer: object, text_first: bool | None = None, timestep_divisor: float | None = None
) -> ModelLayout:
    """The layout of `transformer`, with explicit caller overrides applied."""
    base = LAYOUTS.get(type(transformer).__name__, GENERIC)
    return ModelLayout(
        text_first=base.text_first if text_first is None else text_first,
        timestep_divisor=base.timestep_divisor if timestep_divisor is None else timestep_divisor,
        single_stream_text=base.single_stream_text,
    )


def layer_identity(module_path: str) -> tuple[str, str, int]:
    """`(layer_key, block_type, block_index)` of the attention module at `module_path`.

    `transformer_blocks.3.attn` → `("double:3", "double", 3)`;
    `single_transformer_blocks.7.attn` → `("single:7", "single", 7)`;
    a second attention in a block (`transformer_blocks.3.attn2`) → `("double:3.attn2", "double", 3)`;
    anything else keeps its module path as a host-specific key, block type `"other"`.
    """
    m = _PATH.match(module_path)
    if m and m["blocks"] in _BLOCK_TYPES:
        kind, index = _BLOCK_TYPES[m["blocks"]], int(m["index"])
        key = f"{kind}:{index}" if m["attn"] == "attn" else f"{kind}:{index}.{m['attn']}"
        return key, kind, index
    if m:
        return module_path, "other", int(m["index"])
    return module_path, "other", -1
