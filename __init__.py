"""attnplug: swap and learn the attention of diffusion transformers (Flux.1 / Flux.2).

`import attnplug` pulls in neither ComfyUI nor diffusers, comet_ml, lpips or triton.

The repository root is this package. ComfyUI imports the folder under its own name (e.g.
`ComfyUI-attnplug`); the block below makes that import an alias of the canonical `attnplug`
package so that the process keeps one plugin registry and one copy of every module.
"""
from __future__ import annotations

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

if __name__ != "attnplug":  # imported as a ComfyUI custom-node folder (or under any other name)
    _canonical = _sys.modules.get("attnplug")
    if _canonical is None:
        _spec = _ilu.spec_from_file_location("attnplug", __file__,
                                             submodule_search_locations=[str(_Path(__file__).parent)])
        assert _spec is not None and _spec.loader is not None
        _canonical = _ilu.module_from_spec(_spec)
        _sys.modules["attnplug"] = _canonical
        _spec.loader.exec_module(_canonical)
    globals().update({k: v for k, v in vars(_canonical).items() if not k.startswith("__")})
    __all__ = list(getattr(_canonical, "__all__", []))
    _sys.modules[__name__] = _canonical
else:
    from .core import (AttentionCall, Backend, Config, ConfigError, LayerSpec, LearnedBackend, Session,
                       get_plugins, hookimpl, load)

    __version__ = "0.1.0"

    def comfy_entrypoint():  # noqa: ANN201 - ComfyUI V3 entry point; imports ComfyUI only when called
        """ComfyUI V3 entry point: returns the attnplug `ComfyExtension` (needs ComfyUI)."""
        from .hosts.comfy.extension import comfy_entrypoint as _entry

        return _entry()

    __all__ = ["AttentionCall", "Backend", "Config", "ConfigError", "LayerSpec", "LearnedBackend", "Session",
               "comfy_entrypoint", "get_plugins", "hookimpl", "load", "__version__"]
