"""The `[plugins.controller]` config section: which plan to serve, and how calibration finds one."""
from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator, model_validator

from ...core.config import Strict
from ...core.patterns import validate_layer_pattern


class TermBudget(Strict):
    """One quality term of a calibration budget: its registered kind, a bound, and its weight."""

    kind: str = Field(..., description="Registered quality term (`attnplug plugins list` names them), e.g. "
                                       "'lpips', 'latent_rmse', 'velocity_fidelity', 'trajectory_psnr'.")
    max: float | None = Field(None, description="Bound for a lower-is-better term: the plan's mean value over "
                                                "the calibration prompts must not exceed it.")
    min: float | None = Field(None, description="Bound for a higher-is-better term (decibels, e.g. "
                                                "'trajectory_psnr'): the plan's mean must reach it.")
    weight: float = Field(1.0, gt=0, description="Weight of this term when cells are ordered by their cost "
                                                 "(the sum of weighted budget shares).")
    options: dict[str, Any] = Field(default_factory=dict, description="The term's own settings (e.g. "
                                                                      "{net = 'alex'} for lpips).")

    @model_validator(mode="after")
    def _one_bound(self) -> "TermBudget":
        given = [b for b in (self.max, self.min) if b is not None]
        if len(given) != 1:
            raise ValueError(f"term {self.kind!r}: give exactly one of `max` (lower is better) or `min` "
                             "(higher is better)")
        if not math.isfinite(given[0]):
            raise ValueError(f"term {self.kind!r}: its bound must be a finite number, got {given[0]}")
        if self.max is not None and self.max <= 0:
            raise ValueError(f"term {self.kind!r}: `max` must be > 0 (0 would allow only exact attention)")
        return self

    @property
    def bound(self) -> float:
        return float(self.max if self.max is not None else self.min)  # type: ignore[arg-type]


def _default_terms() -> list[TermBudget]:
    return [TermBudget(kind="velocity_fidelity", max=0.02), TermBudget(kind="latent_rmse", max=0.3)]


class CalibrationSettings(Strict):
    """How `attnplug calibrate` measures cells and searches a plan."""

    prompts: int = Field(8, ge=1, le=4096, description="Calibration prompts (each sampled once per measured "
                                                       "plan, with the same noise every time).")
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of the calibration prompts' noise.")
    sigma_bands: list[float] = Field(
        default_factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.0],
        description="Edges of the σ bands, strictly decreasing, the last one 0: band i holds the steps with "
                    "edge[i+1] < σ <= edge[i] (σ above the first edge counts as the first band, σ = 0 as the "
                    "last). High-noise steps, where the layout forms, tolerate approximation least.")
    layers: list[str] = Field(default_factory=lambda: ["*"], description="Layer patterns whose cells may enter "
                                                                         "the plan (layers must also be ready).")
    terms: list[TermBudget] = Field(default_factory=_default_terms, description="The budget: every term's mean "
                                                                                "must stay within its bound.")
    second_pass: bool = Field(True, description="After the greedy pass, retry the cells it rejected once "
                                                "(interactions between cells change what fits).")

    @field_validator("sigma_bands")
    @classmethod
    def _bands(cls, v: list[float]) -> list[float]:
        if len(v) < 2:
            raise ValueError("needs at least two edges (one band), e.g. [1.0, 0.0]")
        if any(not math.isfinite(x) for x in v):
            raise ValueError(f"edges must be finite numbers, got {v}")
        if any(b >= a for a, b in zip(v, v[1:])):
            raise ValueError(f"edges must be strictly decreasing, got {v}")
        if v[-1] != 0.0:
            raise ValueError(f"the last edge must be 0 (the band of the final steps), got {v[-1]}")
        return v

    @field_validator("layers")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return [validate_layer_pattern(p) for p in v]

    @field_validator("terms")
    @classmethod
    def _terms(cls, v: list[TermBudget]) -> list[TermBudget]:
        if not v:
            raise ValueError("at least one quality term is needed")
        kinds = [t.kind for t in v]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each term kind may appear once, got {kinds}")
        return v


class ControllerSettings(Strict):
    """`[plugins.controller]`: the serving plan and its calibration."""

    plan: str = Field("checkpoint", description="Serving plan to use: 'checkpoint' (the plan stored in the "
                                                "loaded checkpoint, if any), 'off' (readiness alone decides), or "
                                                "the path of a plan file written by `attnplug calibrate --plan-out`.")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings,
                                             description="How `attnplug calibrate` finds a plan.")
