"""controller plugin: its config section, the built-in quality terms, and the plan gate of every session."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...core.hookspecs import hookimpl
from .gate import PlanGate
from .lpips_term import LpipsSettings, LpipsTerm
from .policy_checkpoint import load_policy
from .policy_gate import PolicyGate
from .settings import ControllerSettings
from .terms import BUILTIN_TERMS

if TYPE_CHECKING:
    from ...core.registrar import Registrar
    from ...core.session import Session


@hookimpl
def attnplug_config_sections() -> dict[str, type[ControllerSettings]]:
    return {"controller": ControllerSettings}


def _doc(cls: type) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0]


@hookimpl
def attnplug_register_quality_terms(registrar: "Registrar") -> None:
    for name, cls in BUILTIN_TERMS.items():
        registrar.add(name, lambda settings, context, cls=cls: cls(), None, doc=_doc(cls))
    registrar.add("lpips", _lpips, LpipsSettings, doc="LPIPS of the decoded images (the `lpips` package; backbone "
                                                      "weights from the torch hub cache)")


def _lpips(settings: Any, context: Any) -> LpipsTerm:
    return LpipsTerm(settings if isinstance(settings, LpipsSettings) else LpipsSettings())


@hookimpl
def attnplug_session_start(session: "Session") -> None:
    """Every session serves through the plan gate (the stored plan when there is one, else readiness alone) and
    the policy gate (standing aside unless `[plugins.controller] policy` names a policy file, or a host or the
    trainer sets one)."""
    settings = session.config.sections.get("controller")
    settings = settings if isinstance(settings, ControllerSettings) else ControllerSettings()
    gate = PolicyGate(session, mode=settings.policy_mode, threshold=settings.policy_threshold,
                      seed=session.config.root.seed)
    session.router.gates += [gate, PlanGate(settings, session)]
    if settings.policy != "off":
        loaded = load_policy(settings.policy)
        gate.set_policy(loaded.policy, source=settings.policy)
