"""ComfyUI host: binds attnplug sessions to ModelPatchers and provides the V3 custom nodes.

Importing this package does not import ComfyUI; `extension.py` and the node modules do, and only
ComfyUI (through the root `comfy_entrypoint()`) or tests with the stand-in import them.
"""
from .binding import AttnplugBinding, SessionSpec, bind, current_binding

__all__ = ["AttnplugBinding", "SessionSpec", "bind", "current_binding"]
