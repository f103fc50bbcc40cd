"""ttr plugin: the learned `ttr` backend and its `[plugins.ttr]` config section.

The hybrid layer's landmark residual comes from the `landmark` plugin through the session's backend
registry (see backend.py); without it, ttr runs kernel-only.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...core.hookspecs import hookimpl
from .backend import TtrBackend
from .settings import TtrSettings

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ...core.registrar import Registrar

log = logging.getLogger("attnplug")


def _distill() -> Any:
    """The online distiller module (plugins/ttr/distill.py), or None when it cannot be imported."""
    try:
        from . import distill
    except Exception as exc:  # noqa: BLE001 - the backend stays usable without the distiller
        log.warning("attnplug: ttr: the online distiller is unavailable: %s: %s", type(exc).__name__, exc)
        return None
    return distill


@hookimpl
def attnplug_config_sections() -> "dict[str, type[BaseModel]]":
    """`[plugins.ttr]` (the backend) and `[plugins.distill]` (the online distiller)."""
    sections: dict[str, Any] = {"ttr": TtrSettings}
    distill = _distill()
    if distill is not None:
        sections["distill"] = distill.DistillSettings
    return sections


@hookimpl
def attnplug_register_distillers(registrar: "Registrar") -> None:
    distill = _distill()
    if distill is not None:
        distill.register_distiller(registrar, name="ttr", section="distill")


def _factory(settings: Any, session: Any) -> TtrBackend:
    return TtrBackend(settings if isinstance(settings, TtrSettings) else None, session)


_factory.capabilities = TtrBackend.capabilities  # type: ignore[attr-defined]  # config checks exactness


@hookimpl
def attnplug_register_backends(registrar: "Registrar") -> None:
    registrar.add("ttr", _factory, TtrSettings,
                  doc="learned kernel-regression attention with a landmark residual (linear time)")
