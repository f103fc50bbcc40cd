"""attnplug for diffusers: `apply(pipe_or_transformer, config_or_session) -> Handle`.

Importing this package imports diffusers (the `attnplug[diffusers]` extra); `import attnplug` does not.
See README.md in this folder.
"""

from .apply import Handle, apply, find_transformer
from .layout import LAYOUTS, ModelLayout, layer_identity
from .processors import LayerProcessor

__all__ = [
    "LAYOUTS",
    "Handle",
    "LayerProcessor",
    "ModelLayout",
    "apply",
    "find_transformer",
    "layer_identity",
]
