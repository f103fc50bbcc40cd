"""ComfyUI V3 entry point: `comfy_entrypoint()` returns attnplug's `ComfyExtension`.

ComfyUI calls the repository root's `comfy_entrypoint` (root `__init__.py`), which imports this
module lazily. It must stay synchronous: the root function returns whatever this one returns.
"""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from .configs import FOLDER, models_folder

log = logging.getLogger("attnplug")


class AttnplugExtension(ComfyExtension):
    async def on_load(self) -> None:
        """Register `models/attnplug/` as a model folder (so extra_model_paths.yaml can point elsewhere)."""
        try:
            import folder_paths  # type: ignore[import-not-found]
        except ImportError:
            return
        if FOLDER not in getattr(folder_paths, "folder_names_and_paths", {}):
            folder_paths.add_model_folder_path(FOLDER, str(models_folder()), is_default=True)

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes import NODES
        from .nodes_utils import NODES as UTILS

        return [*NODES, *UTILS]


def comfy_entrypoint() -> AttnplugExtension:
    """The extension ComfyUI loads (synchronous on purpose, see the module docstring)."""
    return AttnplugExtension()
