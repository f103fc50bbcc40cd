"""Gates decide, per (step, layer), whether the approximate backend may run — fail-closed.

Each gate returns ALLOW (no objection), VETO (use the exact path) or FORCE(name) (use that
backend). The router combines them in config order:

1. the first gate that forces an *exact* backend wins;
2. otherwise any veto sends the call to the exact backend;
3. otherwise the first gate that forces an approximate backend picks it, else the configured
   `backend` runs;
4. a learned backend additionally needs `is_ready(layer)`; a non-ready layer goes exact.

So an approximate backend runs only when every gate allows it. Decisions are cached per
(run, step, layer, cond, image tokens) and recomputed when the step changes.

A gate whose `decide` raises (or returns something that is not a `GateDecision`, or forces a backend
that is not registered) vetoes, and a learned backend whose `is_ready` raises is not ready: the route
goes exact and carries the failure in `Route.failures`, which the session counts, warns about once,
and raises in strict mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from pydantic import Field, field_validator, model_validator

from .call import AttentionCall
from .config import CheckContext, Strict, reject_nan
from .patterns import any_layer_matches, step_in_range, validate_layer_pattern, validate_step_range

if TYPE_CHECKING:
    from .backend import BackendRegistry


@dataclass(frozen=True)
class GateDecision:
    """What one gate says about one (step, layer)."""

    verdict: Literal["allow", "veto", "force"]
    backend: str | None = None
    reason: str = ""


ALLOW = GateDecision("allow")


def veto(reason: str) -> GateDecision:
    return GateDecision("veto", None, reason)


def force(backend: str, reason: str) -> GateDecision:
    return GateDecision("force", backend, reason)


@runtime_checkable
class Gate(Protocol):
    """A gate: `decide(call)` is called once per (step, layer), never per attention call."""

    name: str

    def decide(self, call: AttentionCall) -> GateDecision: ...


@dataclass(frozen=True)
class Route:
    """The router's answer for one (step, layer): which backend runs and why; `failures` are the
    `(kind, message)` of gates or readiness checks that raised (each counted a veto)."""

    backend: str
    approximate: bool
    reason: str
    failures: tuple[tuple[str, str], ...] = ()


def _name(obj: object) -> str:
    """`obj.name` for messages, never raising (a plugin's `name` may be a property that fails)."""
    try:
        return str(getattr(obj, "name"))
    except Exception:  # noqa: BLE001
        return type(obj).__name__


def _error(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - an exception whose text raises
        return type(exc).__name__


class Router:
    """Combines gates (config order) with readiness into a cached per-(step, layer) route."""

    def __init__(self, gates: list[Gate], backends: "BackendRegistry", primary: str, exact: str) -> None:
        self.gates = gates
        self.backends = backends
        self.primary = primary
        self.exact = exact
        self._cache: dict[tuple[object, ...], Route] = {}
        self._cache_step: tuple[object, ...] | None = None
        #: layers never served whatever the gates say, with the reason (e.g. distilled on another model)
        self.withheld: dict[str, str] = {}

    def is_exact(self, name: str) -> bool:
        return self.backends.get(name).capabilities.exact

    def route(self, call: AttentionCall, run_index: int = 0) -> Route:
        """The backend for `call`, cached per (run, step, layer, cond, image tokens)."""
        step = (run_index, call.step_index, call.sigma if call.step_index is None else None)
        if step != self._cache_step:
            self._cache.clear()
            self._cache_step = step
        key = (call.layer_key, call.cond, call.n_image_tokens)  # a gate may decide by the image size
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self.decide(call)
        return hit

    def invalidate(self) -> None:
        """Forget cached routes (readiness or policy changed)."""
        self._cache.clear()

    def decide(self, call: AttentionCall) -> Route:
        """Combine every gate's decision for `call` (uncached). Fail-closed: a gate or readiness check that
        raises is a veto, recorded in `Route.failures`."""
        withheld = self.withheld.get(call.layer_key)
        if withheld is not None:
            return Route(self.exact, False, withheld)
        vetoes: list[str] = []
        failures: list[tuple[str, str]] = []
        forced_approx: GateDecision | None = None
        for gate in self.gates:
            try:
                d = gate.decide(call)
                if not isinstance(d, GateDecision):
                    raise TypeError(f"decide returned {type(d).__name__}, expected a GateDecision")
                forced_exact = d.verdict == "force" and d.backend is not None and self.is_exact(d.backend)
            except Exception as exc:  # noqa: BLE001 - a failing gate must never abort sampling: it vetoes
                message = f"gate {_name(gate)!r} failed on {call.layer_key}: {_error(exc)}"
                failures.append(("gate error", message))
                vetoes.append(message)
                continue
            if forced_exact:
                return Route(d.backend, False, f"{_name(gate)}: {d.reason}", tuple(failures))  # type: ignore[arg-type]
            if d.verdict == "force" and d.backend is not None:
                if forced_approx is None:
                    forced_approx = d
            elif d.verdict == "veto":
                vetoes.append(f"{_name(gate)}: {d.reason}")
        if vetoes:
            return Route(self.exact, False, "; ".join(vetoes), tuple(failures))
        name = forced_approx.backend if forced_approx and forced_approx.backend else self.primary
        try:
            if self.is_exact(name):
                return Route(name, False, "configured exact backend")
            ready = bool(self.backends.get(name).is_ready(call.layer_key))
        except Exception as exc:  # noqa: BLE001 - a readiness check that raises means "not ready"
            message = f"readiness check of {name!r} failed on {call.layer_key}: {_error(exc)}"
            return Route(self.exact, False, message, (("readiness error", message),))
        if not ready:
            return Route(self.exact, False, f"readiness: layer {call.layer_key} is not ready for {name!r}")
        return Route(name, True, forced_approx.reason if forced_approx else "all gates allow")


# ---- built-in gates ---------------------------------------------------------------------------

def _check_order(lo_name: str, lo: float, hi_name: str, hi: float | None) -> None:
    """A range setting's bounds must be ordered (`hi` None: no upper bound)."""
    if hi is not None and lo > hi:
        raise ValueError(f"{lo_name} ({lo}) must not exceed {hi_name} ({hi})")


class LayerFilterSettings(Strict):
    """`kind = "layers"`: the approximate backend only runs on matching layers."""

    include: list[str] = Field(default_factory=lambda: ["*"], description="Layer patterns allowed "
                                                                           "('single:*', 'double:0', 'single:3-5').")
    exclude: list[str] = Field(default_factory=list, description="Layer patterns vetoed (wins over include).")

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return [validate_layer_pattern(p) for p in v]

    def check_semantics(self, ctx: CheckContext, section: str) -> None:
        ctx.layer_patterns(section, "include", self.include)
        ctx.layer_patterns(section, "exclude", self.exclude)


class LayerFilterGate:
    name = "layers"

    def __init__(self, settings: LayerFilterSettings) -> None:
        self.settings = settings

    def decide(self, call: AttentionCall) -> GateDecision:
        if any_layer_matches(self.settings.exclude, call.layer_key):
            return veto(f"layer {call.layer_key} excluded")
        if not any_layer_matches(self.settings.include, call.layer_key):
            return veto(f"layer {call.layer_key} not in {self.settings.include}")
        return ALLOW


class SigmaWindowSettings(Strict):
    """`kind = "sigma_window"`: approximate only while min <= sigma <= max."""

    min: float = Field(0.0, ge=0.0, description="Lowest sigma at which approximation is allowed.")
    max: float = Field(float("inf"), ge=0.0, allow_inf_nan=True,
                       description="Highest sigma at which approximation is allowed (inf: no upper bound).")

    @field_validator("max")
    @classmethod
    def _not_nan(cls, v: float) -> float:
        return reject_nan(v)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _order(self) -> "SigmaWindowSettings":
        _check_order("min", self.min, "max", self.max)
        return self


class SigmaWindowGate:
    name = "sigma_window"

    def __init__(self, settings: SigmaWindowSettings) -> None:
        self.settings = settings

    def decide(self, call: AttentionCall) -> GateDecision:
        s = call.sigma
        if s is None:
            return veto("sigma unknown (fail-closed)")
        if not self.settings.min <= s <= self.settings.max:
            return veto(f"sigma {s:.4g} outside [{self.settings.min}, {self.settings.max}]")
        return ALLOW


class TokensSettings(Strict):
    """`kind = "tokens"`: approximate only for image sizes where it pays (min ≤ image tokens ≤ max).

    An approximate layer slower than exact attention is pointless: on an H200 the default ttr layer is
    slightly slower than cuDNN at 1024² (4096 image tokens) and 1.66× faster at 1280² (6400; docs/PERFORMANCE.md,
    "One layer"), so a Flux config that serves ttr at every size sets `min_image_tokens` between the two
    (examples/configs/flux_ttr_large_images.toml: 6144)."""

    min_image_tokens: int = Field(0, ge=0, description="Fewest image tokens of a call that may run approximate.")
    max_image_tokens: int | None = Field(None, ge=0, description="Most image tokens (none: no upper bound).")

    @model_validator(mode="after")
    def _order(self) -> "TokensSettings":
        _check_order("min_image_tokens", self.min_image_tokens, "max_image_tokens", self.max_image_tokens)
        return self


class TokensGate:
    name = "tokens"

    def __init__(self, settings: TokensSettings) -> None:
        self.settings = settings

    def decide(self, call: AttentionCall) -> GateDecision:
        n, lo, hi = call.n_image_tokens, self.settings.min_image_tokens, self.settings.max_image_tokens
        if n < lo or (hi is not None and n > hi):
            return veto(f"{n} image tokens outside [{lo}, {'∞' if hi is None else hi}]")
        return ALLOW


class StepWindowSettings(Strict):
    """`kind = "step_window"`: approximate only on the listed step ranges."""

    steps: list[str] = Field(..., description="Step ranges where approximation is allowed: 'A-B', ':N', '-N:', 'A:'.")

    @field_validator("steps")
    @classmethod
    def _ranges(cls, v: list[str]) -> list[str]:
        return [validate_step_range(s) for s in v]


class StepWindowGate:
    name = "step_window"

    def __init__(self, settings: StepWindowSettings) -> None:
        self.settings = settings

    def decide(self, call: AttentionCall) -> GateDecision:
        for spec in self.settings.steps:
            inside = step_in_range(spec, call.step_index, call.num_steps)
            if inside:
                return ALLOW
        return veto(f"step {call.step_index} outside {self.settings.steps} (unknown counts as outside)")


class ScheduleRule(Strict):
    """One schedule rule: where it applies (all given conditions must hold) and which backend runs."""

    backend: str = Field(..., description="Backend to force where the rule applies.")
    steps: str | None = Field(None, description="Step range ('0-1', ':2', '-2:', '5:').")
    sigma_min: float | None = Field(None, description="Applies when sigma >= sigma_min.")
    sigma_max: float | None = Field(None, description="Applies when sigma <= sigma_max.")
    layers: list[str] = Field(default_factory=lambda: ["*"], description="Layer patterns the rule covers.")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: str | None) -> str | None:
        return None if v is None else validate_step_range(v)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[str]) -> list[str]:
        return [validate_layer_pattern(p) for p in v]


class ScheduleSettings(Strict):
    """`kind = "schedule"`: force a backend by step/sigma range and layer pattern; first matching rule wins."""

    rules: list[ScheduleRule] = Field(..., description="Rules in priority order.")

    def check_semantics(self, ctx: CheckContext, section: str) -> None:
        for i, rule in enumerate(self.rules):
            ctx.backend(section, f"rules.{i}.backend", rule.backend)
            ctx.layer_patterns(section, f"rules.{i}.layers", rule.layers)


class ScheduleGate:
    """Forces backends by step, sigma and layer, e.g. exact on the first and last two steps.

    When a rule's step range cannot be decided (the host gave no step count for '-N:'), a rule
    that forces an exact backend applies (fail-closed) and one that forces an approximate backend
    does not.
    """

    name = "schedule"

    def __init__(self, settings: ScheduleSettings, is_exact: "callable[[str], bool]") -> None:  # type: ignore[valid-type]
        self.settings = settings
        self.is_exact = is_exact

    def decide(self, call: AttentionCall) -> GateDecision:
        for i, rule in enumerate(self.settings.rules):
            if not any_layer_matches(rule.layers, call.layer_key):
                continue
            if rule.steps is not None:
                inside = step_in_range(rule.steps, call.step_index, call.num_steps)
                if inside is None:
                    inside = self.is_exact(rule.backend)
                if not inside:
                    continue
            if rule.sigma_min is not None or rule.sigma_max is not None:
                if call.sigma is None:
                    if not self.is_exact(rule.backend):
                        continue
                elif not ((rule.sigma_min is None or call.sigma >= rule.sigma_min)
                          and (rule.sigma_max is None or call.sigma <= rule.sigma_max)):
                    continue
            return force(rule.backend, f"rule {i} ({rule.backend})")
        return ALLOW
