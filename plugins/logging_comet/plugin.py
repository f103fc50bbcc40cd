"""logging_comet plugin: registers the `comet` logger kind (comet_ml is imported when its experiment starts)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...core.hookspecs import hookimpl
from .logger import CometLogger
from .settings import CometSettings

if TYPE_CHECKING:
    from ...core.registrar import Registrar
    from ...core.session import Session


def _factory(settings: CometSettings, session: "Session") -> CometLogger:
    return CometLogger(settings, session.config)


@hookimpl
def attnplug_register_loggers(registrar: "Registrar") -> None:
    registrar.add("comet", _factory, CometSettings,
                  doc="Comet experiment: metrics, config as parameters, images (comet_ml; offline archives too)")
