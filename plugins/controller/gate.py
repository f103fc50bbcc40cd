"""The plan gate: approximate attention only on the cells of the serving plan.

Added to every session by the controller plugin (`[plugins.controller] plan`, default 'checkpoint').
The plan comes from the loaded checkpoint's `controller.plan` component or from a plan file; while a
calibration runs, it sets a candidate plan instead. Decisions are made once per (step, layer) by the
router, never per attention call.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...core.backend import LearnedBackend
from ...core.call import AttentionCall
from ...core.checkpoint import CheckpointError
from ...core.gates import ALLOW, GateDecision, veto
from .plan import PLAN_COMPONENT, ServingPlan, band_index, band_label, fingerprint_tensors
from .settings import ControllerSettings

if TYPE_CHECKING:
    from ...core.session import Session

log = logging.getLogger("attnplug")

NO_PLAN_HINT = ("run `attnplug calibrate --config CONFIG --checkpoint CHECKPOINT` to measure which layers and "
                "steps keep the image, and store the plan in the checkpoint")


class PlanGate:
    """Vetoes every (layer, σ) outside the serving plan; allows everything when there is no plan."""

    name = "plan"

    def __init__(self, settings: ControllerSettings, session: "Session") -> None:
        self.settings = settings
        self.session = session
        #: set by calibration: the plan under measurement (overrides the stored one while set)
        self.candidate: ServingPlan | None = None
        self._resolved_for: Any = object()
        self._plan: ServingPlan | None = None
        self._source = ""
        self._noted = False
        if settings.plan not in ("checkpoint", "off"):  # a plan file: checked before any work starts
            self.stored_plan()

    # ---- which plan ----------------------------------------------------------------------------------
    def stored_plan(self) -> tuple[ServingPlan | None, str]:
        """The plan the settings name (checkpoint component or file), resolved once per loaded checkpoint."""
        mode = self.settings.plan
        component = self.session.components.get(PLAN_COMPONENT) if mode == "checkpoint" else None
        key = (mode, id(component))
        if key != self._resolved_for:
            self._resolved_for = key
            self._plan, self._source = self._resolve(mode, component)
            if self._plan is not None:
                self._check_fingerprint(self._plan)
        return self._plan, self._source

    def _resolve(self, mode: str, component: Any) -> tuple[ServingPlan | None, str]:
        if mode == "off":
            return None, "off"
        if mode == "checkpoint":
            if component is None:
                return None, ""
            source = f"checkpoint {self.session.checkpoint_path}"
            return ServingPlan.from_json(component[1], source), source
        path = Path(mode)
        if not path.is_file():
            raise CheckpointError(f"[plugins.controller] plan: no plan file at {path} (give 'checkpoint', 'off' or "
                                  "the path of a file written by `attnplug calibrate --plan-out`)")
        return ServingPlan.load_json(path), f"plan file {path}"

    def _check_fingerprint(self, plan: ServingPlan) -> None:
        backend = self.session.backends.entries.get(plan.backend or "")
        if backend is None or plan.fingerprint is None or not isinstance(backend.backend, LearnedBackend):
            return
        now = fingerprint_tensors(backend.backend.state()[0])  # type: ignore[attr-defined]
        if now != plan.fingerprint:
            log.warning("attnplug: the serving plan (%s) was calibrated for other weights of backend %r (its "
                        "layers were trained since); its cells may no longer keep the image — calibrate again",
                        self._source, plan.backend)

    def plan(self) -> ServingPlan | None:
        """The plan in force: the calibration candidate while one is set, else the stored plan."""
        return self.candidate if self.candidate is not None else self.stored_plan()[0]

    # ---- the gate -----------------------------------------------------------------------------------
    def decide(self, call: AttentionCall) -> GateDecision:
        if self.candidate is None and self._policy_decides():
            return ALLOW  # a routing policy replaces the plan (it is the baseline the policy is trained to beat)
        plan = self.plan()
        if plan is None:
            self._note_missing_plan()
            return ALLOW
        if plan.allows(call.layer_key, call.sigma):
            return ALLOW
        if call.sigma is None:
            return veto("sigma unknown: the serving plan decides by σ band (fail-closed)")
        band = band_label(plan.edges, band_index(plan.edges, call.sigma))
        return veto(f"{call.layer_key} at {band} is not in the serving plan")

    def _policy_decides(self) -> bool:
        from .policy_gate import policy_gate

        gate = policy_gate(self.session)
        return gate is not None and gate.active

    def _note_missing_plan(self) -> None:
        if self._noted or self.settings.plan == "off" or self.session.training:
            return
        if not isinstance(self.session.primary, LearnedBackend):
            return
        self._noted = True
        where = f"checkpoint {self.session.checkpoint_path}" if self.session.checkpoint_path else "this session"
        log.warning("attnplug: %s has no serving plan: every ready layer is served on every step, and readiness "
                    "(each layer's own output error) does not see what a layer does to the image; %s",
                    where, NO_PLAN_HINT)

    def describe(self) -> str:
        """What this gate serves, for hosts to report (one line)."""
        if self.candidate is None and self._policy_decides():
            return "serving plan: stands aside (a routing policy decides)"
        plan = self.plan()
        if plan is None:
            return ("serving plan: off (readiness alone decides)" if self.settings.plan == "off" else
                    "serving plan: none (every ready layer is served); " + NO_PLAN_HINT)
        share = plan.report.get("share_served")
        share_txt = f", {100 * share:.0f} % of layer-steps at calibration" if isinstance(share, (int, float)) else ""
        return f"serving plan from {self._source or 'calibration'}{share_txt}: {plan.describe()}"


def plan_gate(session: "Session") -> PlanGate | None:
    """The session's plan gate (the controller plugin adds one to every session), or None."""
    return next((g for g in session.router.gates if isinstance(g, PlanGate)), None)
