"""landmark plugin: the `landmark` backend and its `[plugins.landmark]` config section.

Exact softmax against the landmarks (every conditioning token plus an image-token budget) and,
with `window = r > 0`, also against each image query's local (2r+1)² window on the latent grid.

The ttr hybrid layer uses this backend's `branch(q, k, v, call, mask)` through the session's
backend registry (`session.backends.get("landmark")`); the plugins never import each other.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...core.hookspecs import hookimpl
from .backend import LandmarkBackend
from .settings import LandmarkSettings

if TYPE_CHECKING:
    from ...core.registrar import Registrar


@hookimpl
def attnplug_config_sections() -> dict[str, type[LandmarkSettings]]:
    return {"landmark": LandmarkSettings}


def _factory(settings: Any, session: Any) -> LandmarkBackend:
    return LandmarkBackend(settings if isinstance(settings, LandmarkSettings) else None)


_factory.capabilities = LandmarkBackend.capabilities  # type: ignore[attr-defined]  # config checks exactness


@hookimpl
def attnplug_register_backends(registrar: "Registrar") -> None:
    registrar.add("landmark", _factory, LandmarkSettings,
                  doc="exact softmax against all conditioning tokens + a share of image tokens (+ an optional local "
                      "window per image query) (approximate)")
