"""ComfyUI V3 entry point: `comfy_entrypoint()` returns attnplug's `ComfyExtension`.

ComfyUI calls the repository root's `comfy_entrypoint` (root `__init__.py`), which imports this
module lazily. It must stay synchronous: the root function returns whatever this one returns.
"""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from .files import register_folder

log = logging.getLogger("attnplug")


class AttnplugExtension(ComfyExtension):
    async def on_load(self) -> None:
        """Register `models/attnplug/` as the model folder `attnplug` (extra_model_paths.yaml can add more)."""
        register_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes import NODES
        from .nodes_utils import NODES as UTILS

        return [*NODES, *UTILS]


def comfy_entrypoint() -> AttnplugExtension:
    """The extension ComfyUI loads (synchronous on purpose, see the module docstring)."""
    return AttnplugExtension()
