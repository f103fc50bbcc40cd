"""The core's own plugin: exact backends, built-in gates and loggers."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .exact import HostBackend, SdpaBackend
from .gates import (LayerFilterGate, LayerFilterSettings, ScheduleGate, ScheduleSettings, SigmaWindowGate,
                    SigmaWindowSettings, StepWindowGate, StepWindowSettings, TokensGate, TokensSettings)
from .hookspecs import hookimpl
from .loggers import ConsoleLogger, ConsoleSettings, JsonlLogger, JsonlSettings

if TYPE_CHECKING:
    from .registrar import Registrar
    from .session import Session


@hookimpl
def attnplug_register_backends(registrar: "Registrar") -> None:
    registrar.add("sdpa", _build(SdpaBackend), doc="torch scaled_dot_product_attention (exact)")
    registrar.add("host", _build(HostBackend), doc="the host's own attention function (exact)")


def _build(cls: type) -> Any:
    def factory(settings: Any, session: "Session") -> Any:
        return cls()

    factory.capabilities = cls.capabilities  # type: ignore[attr-defined]  # config checks exactness
    return factory


@hookimpl
def attnplug_register_gates(registrar: "Registrar") -> None:
    registrar.add("layers", lambda s, session: LayerFilterGate(s), LayerFilterSettings,
                  doc="approximate only on matching layers ('single:*', 'double:0', 'single:3-5')")
    registrar.add("sigma_window", lambda s, session: SigmaWindowGate(s), SigmaWindowSettings,
                  doc="approximate only while min <= sigma <= max")
    registrar.add("step_window", lambda s, session: StepWindowGate(s), StepWindowSettings,
                  doc="approximate only on listed step ranges")
    registrar.add("schedule", lambda s, session: ScheduleGate(s, session.router_is_exact), ScheduleSettings,
                  doc="force a backend per step/sigma range and layer pattern (first matching rule wins)")
    registrar.add("tokens", lambda s, session: TokensGate(s), TokensSettings,
                  doc="approximate only while min_image_tokens <= image tokens <= max_image_tokens")


@hookimpl
def attnplug_register_loggers(registrar: "Registrar") -> None:
    registrar.add("console", lambda s, session: ConsoleLogger(s), ConsoleSettings, doc="compact lines on stderr")
    registrar.add("jsonl", lambda s, session: JsonlLogger(s), JsonlSettings, doc="one JSON object per line")
