"""Stand-in of `comfy_api/latest/__init__.py`: `ComfyExtension` and the `io` namespace."""
from __future__ import annotations

from abc import ABC, abstractmethod

from . import _io as io


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        """Called once when the extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The node classes this extension provides."""


__all__ = ["ComfyExtension", "io"]
