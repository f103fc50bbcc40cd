"""Calibration: measure what serving each (layer, σ band) cell does to the samples, then search a plan.

Host-agnostic: a `CalibrationSampler` samples the same calibration prompts from the same noise every
time it is called, through a session whose plan gate the calibration steers. The search:

1. the exact reference (an empty plan: every call exact), which also tells the layers and the σ of
   each step;
2. every eligible cell alone (layer ready and matching `calibration.layers`, band with >= 1 step):
   its mean value of every quality term against the reference;
3. greedy: cells in order of cost — the weighted sum of each term's share of its budget, per
   layer-step the cell serves — each added only if the *cumulative* plan, sampled again, keeps every
   term within its bound; cells over budget on their own are never tried;
4. optionally a second pass over the cells the greedy pass rejected (interactions change what fits).

Sampler runs: 1 + C + (at most) C for C cells, plus at most C in the second pass — linear in
layers × bands.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from tqdm.auto import tqdm

from ...core.backend import LearnedBackend
from ...core.patterns import any_layer_matches
from ...core.quality import QualityError, QualityTerm, Sample, budget_fraction, mean_scores, within
from .gate import PlanGate, plan_gate
from .plan import Cell, ServingPlan, band_index, band_label, fingerprint_tensors
from .settings import CalibrationSettings, TermBudget

if TYPE_CHECKING:
    from ...core.session import Session

log = logging.getLogger("attnplug")

TermFactory = Callable[[Any, Any], QualityTerm]


class CalibrationSampler(Protocol):
    """Samples the calibration prompts through the session, with the same noise on every call."""

    def sample(self) -> Sample: ...


class CalibrationError(ValueError):
    """Calibration cannot run (no learned backend, no ready layer, a term that cannot score)."""


@dataclass
class CellEffect:
    """What serving one cell alone does: the mean of every term, its cost, the layer-steps it serves."""

    layer: str
    band: int
    scores: dict[str, float]
    cost: float
    layer_steps: int

    @property
    def cell(self) -> Cell:
        return (self.layer, self.band)


@dataclass
class SearchStep:
    """One cumulative check of the search: the cell tried, whether the plan kept it, and the plan's scores."""

    layer: str
    band: int
    accepted: bool
    scores: dict[str, float]
    share: float
    reason: str = ""


@dataclass
class CalibrationResult:
    """The plan and everything that was measured on the way to it."""

    plan: ServingPlan
    reference_layers: list[str]
    effects: list[CellEffect] = field(default_factory=list)
    steps: list[SearchStep] = field(default_factory=list)
    final_scores: dict[str, float] = field(default_factory=dict)
    runs: int = 0
    seconds: float = 0.0


def build_terms(budgets: list[TermBudget], session: "Session",
                extra: Mapping[str, TermFactory] | None = None) -> list[QualityTerm]:
    """Build the budget's terms from the registry (plus host-specific `extra` factories, e.g. the testbed's)."""
    registrar = session.plugins.collect("quality_term", session.config.root.disable_plugins)
    terms: list[QualityTerm] = []
    for i, budget in enumerate(budgets):
        where = f"[plugins.controller.calibration] terms[{i}] (kind {budget.kind!r})"
        if extra and budget.kind in extra:
            factory, settings_model = extra[budget.kind], None
        elif budget.kind in registrar.entries:
            reg = registrar.get(budget.kind)
            factory, settings_model = reg.factory, reg.settings
        else:
            known = sorted(set(registrar.entries) | set(extra or {}))
            raise CalibrationError(f"{where}: unknown quality term; registered terms: {known}")
        if settings_model is not None:
            try:
                options = settings_model.model_validate(budget.options)
            except Exception as exc:  # noqa: BLE001 - pydantic's message names the field
                raise CalibrationError(f"{where} options: {exc}") from None
        elif budget.options:
            raise CalibrationError(f"{where}: this term takes no options, got {sorted(budget.options)}")
        else:
            options = None
        try:
            term = factory(options, session)
        except QualityError as exc:
            raise CalibrationError(f"{where}: {exc}") from None
        if (budget.max is not None) != (term.better == "lower"):
            need = "max" if term.better == "lower" else "min"
            raise CalibrationError(f"{where}: this term is {term.better}-is-better, so bound it with `{need}`")
        terms.append(term)
    return terms


def cost_of(scores: Mapping[str, float], terms: list[QualityTerm], budgets: list[TermBudget]) -> float:
    """Weighted sum of every term's share of its budget (0 = exact, 1 per term at its bound)."""
    return sum(b.weight * budget_fraction(t, scores[t.name], b.bound) for t, b in zip(terms, budgets))


def fits(scores: Mapping[str, float], terms: list[QualityTerm], budgets: list[TermBudget]) -> tuple[bool, str]:
    """Whether every term is within its bound, and the first one that is not."""
    for t, b in zip(terms, budgets):
        if not within(t, scores[t.name], b.bound):
            op = "<=" if t.better == "lower" else ">="
            return False, f"{t.name} {scores[t.name]:.4g} (needs {op} {b.bound:g})"
    return True, ""


class Calibrator:
    """Runs the measurement and the search for one session and sampler (see the module docstring)."""

    def __init__(self, session: "Session", sampler: CalibrationSampler, settings: CalibrationSettings,
                 terms: list[QualityTerm], progress: bool = True) -> None:
        gate = plan_gate(session)
        if gate is None:
            raise CalibrationError("calibration needs the controller plugin's plan gate in the session (is the "
                                   "'controller' plugin disabled?)")
        backend = session.primary
        if not isinstance(backend, LearnedBackend):
            raise CalibrationError(f"calibration needs a learned approximate backend as the config's `backend`, "
                                   f"got {session.config.root.backend!r}")
        self.session, self.sampler, self.settings, self.terms = session, sampler, settings, terms
        self.gate: PlanGate = gate
        self.backend = backend
        self.edges = tuple(settings.sigma_bands)
        self.progress = progress
        self.runs = 0
        self._bar: Any = None

    # ---- one measured plan ---------------------------------------------------------------------------
    def _sample(self, plan: ServingPlan) -> Sample:
        self.gate.candidate = plan
        self.session.router.invalidate()
        try:
            sample = self.sampler.sample()
        finally:
            self.session.run_end()
        self.runs += 1
        if self._bar is not None:
            self._bar.update(1)
        return sample

    def _scores(self, plan: ServingPlan, reference: Sample) -> dict[str, float]:
        scores = mean_scores(self.terms, self._sample(plan), reference)
        bad = [n for n, v in scores.items() if math.isnan(v)]
        if bad:
            log.warning("attnplug: calibration: terms %s are NaN for plan %s (counted as over budget)", bad,
                        plan.describe())
        return scores

    def _plan(self, cells: list[Cell]) -> ServingPlan:
        return ServingPlan.from_cells(self.edges, cells)

    # ---- the search -----------------------------------------------------------------------------------
    def run(self) -> CalibrationResult:
        t0 = time.perf_counter()
        was_training = self.session.training
        self.session.training = False
        try:
            return self._run(t0)
        finally:
            self.session.training = was_training
            self.gate.candidate = None
            self.session.router.invalidate()
            if self._bar is not None:
                self._bar.close()

    def _run(self, t0: float) -> CalibrationResult:
        budgets = self.settings.terms
        reference = self._sample(self._plan([]))
        run = self.session.last_run
        layers = sorted(self.session.stats)
        sigmas = [s for s in (run.sigmas if run else []) if s is not None]
        if not layers or not sigmas:
            raise CalibrationError("the reference run reported no attention layers or no σ per step; calibration "
                                   "needs a host that reports σ (diffusers, ComfyUI and the testbed do)")
        layer_sigmas = {layer: list(sigmas) for layer in layers}
        steps_per_band = [sum(1 for s in sigmas if band_index(self.edges, s) == b) for b in range(len(self.edges) - 1)]
        eligible = [layer for layer in layers if any_layer_matches(self.settings.layers, layer)
                    and self.backend.is_ready(layer)]
        if not eligible:
            raise CalibrationError(f"no layer is eligible: calibration.layers {self.settings.layers} match none of "
                                   f"the ready layers of backend {self.backend.name!r} (layers seen: {layers})")
        cells = [(layer, b) for layer in eligible for b, n in enumerate(steps_per_band) if n]
        total = 1 + len(cells) * (3 if self.settings.second_pass else 2)
        if self.progress:
            self._bar = tqdm(total=total, desc="calibrate", unit="run", dynamic_ncols=True)
            self._bar.update(1)

        effects = []
        for layer, band in cells:
            scores = self._scores(self._plan([(layer, band)]), reference)
            cost = cost_of(scores, self.terms, budgets) / steps_per_band[band]
            effects.append(CellEffect(layer, band, scores, cost, steps_per_band[band] ))
            self._log({"cell_cost": cost, **{f"cell_{k}": v for k, v in scores.items()}}, "calibration.cells")
        order = sorted(effects, key=lambda e: (e.cost, e.layer, e.band))

        chosen: list[Cell] = []
        final: dict[str, float] = {t.name: (math.inf if t.better == "higher" else 0.0) for t in self.terms}
        steps: list[SearchStep] = []
        retry: list[CellEffect] = []
        for effect in order:
            ok, why = fits(effect.scores, self.terms, budgets)
            if not ok:
                steps.append(SearchStep(effect.layer, effect.band, False, effect.scores,
                                        self._plan(chosen).share(layer_sigmas), "over budget alone: " + why))
                continue
            accepted, final = self._try(chosen, effect, reference, layer_sigmas, final, steps)
            if not accepted:
                retry.append(effect)
        if self.settings.second_pass:
            for effect in retry:
                _, final = self._try(chosen, effect, reference, layer_sigmas, final, steps)
        if self._bar is not None:
            self._bar.total = self.runs
            self._bar.refresh()

        plan = self._plan(chosen)
        share = plan.share(layer_sigmas)
        plan.backend = self.backend.name
        plan.fingerprint = fingerprint_tensors(self.backend.state()[0])  # type: ignore[attr-defined]
        result = CalibrationResult(plan, layers, effects, steps, final, self.runs, time.perf_counter() - t0)
        plan.report = report_json(result, self.settings, self.terms, steps_per_band, share)
        return result

    def _try(self, chosen: list[Cell], effect: CellEffect, reference: Sample, layer_sigmas: dict[str, list[float]],
             final: dict[str, float], steps: list[SearchStep]) -> tuple[bool, dict[str, float]]:
        trial = self._plan(chosen + [effect.cell])
        scores = effect.scores if not chosen else self._scores(trial, reference)
        ok, why = fits(scores, self.terms, self.settings.terms)
        share = trial.share(layer_sigmas) if ok else self._plan(chosen).share(layer_sigmas)
        steps.append(SearchStep(effect.layer, effect.band, ok, scores, share, "" if ok else "cumulative: " + why))
        self._log({"share_served": share, "accepted": float(ok), **scores}, "calibration.search")
        if ok:
            chosen.append(effect.cell)
            return True, scores
        return False, final

    def _log(self, metrics: dict[str, float], scope: str) -> None:
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        self.session.loggers.log_metrics(finite, self.runs, scope)


def report_json(result: CalibrationResult, settings: CalibrationSettings, terms: list[QualityTerm],
                steps_per_band: list[int], share: float) -> dict[str, Any]:
    """What a plan records about its calibration (stored with it, printed and plotted)."""
    def clean(d: Mapping[str, float]) -> dict[str, float | str]:
        return {k: (v if math.isfinite(v) else str(v)) for k, v in d.items()}

    edges = tuple(settings.sigma_bands)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "prompts": settings.prompts, "seed": settings.seed,
        "budget": [{"kind": b.kind, "max": b.max, "min": b.min, "weight": b.weight} for b in settings.terms],
        "directions": {t.name: t.better for t in terms},
        "bands": [band_label(edges, b) for b in range(len(edges) - 1)], "steps_per_band": steps_per_band,
        "layers": result.reference_layers, "share_served": share, "final_scores": clean(result.final_scores),
        "runs": result.runs, "seconds": round(result.seconds, 2),
        "cells": [{"layer": e.layer, "band": e.band, "cost": e.cost if math.isfinite(e.cost) else "inf",
                   "scores": clean(e.scores)} for e in result.effects],
        "search": [{"layer": s.layer, "band": s.band, "accepted": s.accepted, "share": s.share,
                    "scores": clean(s.scores), "reason": s.reason} for s in result.steps],
    }


def calibrate(session: "Session", sampler: CalibrationSampler, settings: CalibrationSettings | None = None, *,
              extra_terms: Mapping[str, TermFactory] | None = None, progress: bool = True) -> CalibrationResult:
    """Python API: measure every eligible cell on `sampler`'s prompts and search a plan within the budget.

    :param session: a session with the checkpoint loaded and the learned backend as `backend`.
    :param settings: defaults to the session's `[plugins.controller.calibration]`.
    :param extra_terms: host-specific term factories by kind (e.g. the testbed's adherence classifier).
    :return: the plan (not stored yet: `plan.write_plan_into_checkpoint`) and everything measured.
    """
    if settings is None:
        settings = session.config.sections["controller"].calibration  # type: ignore[attr-defined]
    terms = build_terms(settings.terms, session, extra_terms)
    return Calibrator(session, sampler, settings, terms, progress).run()


def run_calibration(config: Any, checkpoint: Any, make_sampler: Callable[["Session", CalibrationSettings], Any], *,
                    out: Any, prompts: int | None = None, write_checkpoint: bool = True, plan_out: Any = None,
                    extra_terms: Mapping[str, TermFactory] | None = None, progress: bool = True) -> dict[str, Any]:
    """The whole job behind `attnplug calibrate`: load `config` (training off) and `checkpoint`, build the
    host's sampler with `make_sampler(session, settings)`, calibrate, then write `out/calibration.{txt,json,png}`,
    the plan into the checkpoint (unless `write_checkpoint` is False) and/or `plan_out`. Returns the report.

    Every input is checked before any sampling; a failure leaves the checkpoint untouched.
    """
    import json
    from pathlib import Path

    from ...core import Session
    from ...core.checkpoint import atomic_write_text
    from ...core.config import load_config
    from .plan import write_plan_into_checkpoint
    from .report import format_report, plot_report

    cfg = load_config(config)
    cfg.root = cfg.root.model_copy(update={"training": False, "checkpoint": None})
    settings = cfg.sections["controller"].calibration  # type: ignore[attr-defined]
    if prompts is not None:
        if prompts < 1:
            raise CalibrationError(f"--prompts must be >= 1, got {prompts}")
        settings = settings.model_copy(update={"prompts": prompts})
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CalibrationError(f"report folder {out} exists and is not a folder")
    session = Session(cfg)
    try:
        session.load(checkpoint)
        terms = build_terms(settings.terms, session, extra_terms)
        sampler = make_sampler(session, settings)
        try:
            result = Calibrator(session, sampler, settings, terms, progress).run()
        finally:
            close = getattr(sampler, "close", None)
            if callable(close):
                close()
    finally:
        session.close()
    report = result.plan.report
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "calibration.json", json.dumps(result.plan.to_json(), indent=1, sort_keys=True))
    atomic_write_text(out / "calibration.txt", format_report(report) + "\n")
    plot_report(report, out / "calibration.png")
    if plan_out is not None:
        result.plan.save_json(plan_out)
    if write_checkpoint:
        write_plan_into_checkpoint(checkpoint, result.plan)
    return report
