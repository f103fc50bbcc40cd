"""ttr plugin: the learned `ttr` backend and its `[plugins.ttr]` config section.

The hybrid layer's landmark residual comes from the `landmark` plugin through the session's backend
registry (see backend.py); without it, ttr runs kernel-only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...core.hookspecs import hookimpl
from .backend import TtrBackend
from .settings import TtrSettings

if TYPE_CHECKING:
    from ...core.registrar import Registrar


@hookimpl
def attnplug_config_sections() -> dict[str, type[TtrSettings]]:
    return {"ttr": TtrSettings}


def _factory(settings: Any, session: Any) -> TtrBackend:
    return TtrBackend(settings if isinstance(settings, TtrSettings) else None, session)


_factory.capabilities = TtrBackend.capabilities  # type: ignore[attr-defined]  # config checks exactness


@hookimpl
def attnplug_register_backends(registrar: "Registrar") -> None:
    registrar.add("ttr", _factory, TtrSettings,
                  doc="learned kernel-regression attention with a landmark residual (linear time)")
