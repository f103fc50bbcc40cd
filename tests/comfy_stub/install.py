"""Install / remove the ComfyUI stand-in for a test module (used from fixtures, never on the normal path)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
STUB_ROOTS = ("comfy", "comfy_api", "folder_paths", "execution")
# attnplug modules that import ComfyUI at module level: re-imported against each fresh stand-in
HOST_MODULES = ("attnplug.hosts.comfy.extension", "attnplug.hosts.comfy.nodes", "attnplug.hosts.comfy.nodes_utils")


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STUB_ROOTS or name in HOST_MODULES:
            del sys.modules[name]


@contextlib.contextmanager
def installed(root: str | Path) -> Iterator[None]:
    """Put the stand-in first on sys.path and point its ComfyUI folders at `root` (`root/models`,
    `root/input`, `root/output`, `root/temp`, the input folder created as ComfyUI does); undo on exit."""
    _purge()
    sys.path.insert(0, str(HERE))
    try:
        import folder_paths

        root = Path(root)
        folder_paths.models_dir = str(root / "models")
        folder_paths.input_directory = str(root / "input")
        folder_paths.output_directory = str(root / "output")
        folder_paths.temp_directory = str(root / "temp")
        (root / "input").mkdir(parents=True, exist_ok=True)
        yield
    finally:
        sys.path.remove(str(HERE))
        _purge()
