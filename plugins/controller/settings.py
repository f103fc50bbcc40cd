"""The `[plugins.controller]` config section: which plan to serve, and how calibration finds one."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ...core.config import CheckContext, Strict
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


class PolicyTrainingSettings(Strict):
    """How `attnplug controller train` trains a routing policy with REINFORCE (plugins/controller/reinforce.py)."""

    terms: list[TermBudget] = Field(default_factory=_default_terms, description="The reward's quality terms: "
                                    "each term's share of its bound, weighted and summed, is an episode's cost. "
                                    "Unset: the calibration's terms (`[plugins.controller.calibration] terms`), so "
                                    "that plan and policy answer to the same budget.")
    cost_budget: float = Field(1.0, gt=0, description="The quality budget in cost units (1.0 = one term at its "
                                                      "bound): the Lagrangian keeps the mean cost at or below it.")
    efficiency: Literal["lagrangian", "target_share"] = Field(
        "lagrangian", description="'lagrangian': reward = share served − λ·cost, λ raised while the mean cost is "
                                  "over cost_budget; 'target_share': reward = −cost − share_weight·|share − "
                                  "target_share|.")
    target_share: float = Field(0.9, ge=0, le=1, description="Share of eligible layer-steps to serve "
                                                             "(efficiency = 'target_share').")
    share_weight: float = Field(1.0, ge=0, description="Weight of the share term (efficiency = 'target_share').")
    lambda_init: float = Field(1.0, ge=0, description="Initial Lagrange multiplier on the cost.")
    lambda_lr: float = Field(0.05, ge=0, description="Dual ascent step of λ per update: λ += lr·(mean cost − "
                                                     "cost_budget), kept in [0, lambda_max].")
    lambda_max: float = Field(50.0, gt=0, description="Upper bound of λ.")
    cost_cap: float = Field(4.0, gt=0, description="The quality floor: an episode's cost counts at most this much, "
                                                   "so one ruined sample does not dominate a whole update.")
    baseline_decay: float = Field(0.9, ge=0, lt=1, description="EMA decay of the reward baseline (and of the "
                                                               "reward scale the advantages are divided by).")
    entropy: float = Field(0.01, ge=0, description="Entropy bonus per eligible decision (keeps exploring).")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip per update.")
    episodes_per_update: int = Field(4, ge=1, le=1024, description="Sampled episodes (one prompt batch each) "
                                                                   "averaged into one update.")
    rollouts_per_key: int = Field(1, ge=1, le=64, description="Rollouts of each (prompts, noise) episode key in one "
                                  "update. 1: the advantage is the reward against the EMA baseline; k > 1: each "
                                  "rollout's baseline is the mean reward of the other k − 1 rollouts of the same "
                                  "key (leave-one-out), so how hard the prompts are cancels and only the routing's "
                                  "effect remains. episodes_per_update must be a multiple of it.")
    prompts_per_episode: int = Field(8, ge=1, le=4096, description="Prompts sampled together in one episode "
                                                                   "(they share the episode's routing).")
    pool: int = Field(64, ge=1, le=1_000_000, description="Distinct (prompts, noise) episodes to draw from; each "
                                                          "one's exact reference is sampled once and cached.")
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of the episode draws and the policy's actions.")
    hidden: int = Field(64, ge=4, le=4096, description="Width of the policy network.")
    init_logit: float = Field(1.0, description="Initial logit of every layer (1.0: serve with p ≈ 0.73).")
    use_text: bool = Field(True, description="Feed the pooled conditioning embedding to the policy (False: the "
                                             "same network without it, the ablation).")
    start_from_plan: bool = Field(True, description="Before the first update of a new policy, fit it to the "
                                                    "session's serving plan (when it has one), so that training "
                                                    "starts from the calibrated plan and improves on it.")
    start_steps: int = Field(200, ge=1, le=100_000, description="Optimiser steps of that fit (start_from_plan).")

    @model_validator(mode="after")
    def _whole_key_groups(self) -> "PolicyTrainingSettings":
        if self.episodes_per_update % self.rollouts_per_key:
            raise ValueError(f"episodes_per_update ({self.episodes_per_update}) must be a multiple of "
                             f"rollouts_per_key ({self.rollouts_per_key})")
        return self


class ControllerSettings(Strict):
    """`[plugins.controller]`: the serving plan and its calibration, the routing policy and its training."""

    plan: str = Field("checkpoint", description="Serving plan to use: 'checkpoint' (the plan stored in the "
                                                "loaded checkpoint, if any), 'off' (readiness alone decides), or "
                                                "the path of a plan file written by `attnplug calibrate --plan-out`.")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings,
                                             description="How `attnplug calibrate` finds a plan.")
    policy: str = Field("off", description="Routing policy to serve: 'off', or the path of a policy file written "
                                           "by `attnplug controller train`. While a policy serves, it decides every "
                                           "(step, layer) and the serving plan stands aside; readiness still holds.")
    policy_mode: Literal["threshold", "stochastic"] = Field(
        "threshold", description="'threshold': serve where P(serve) >= policy_threshold (deterministic); "
                                 "'stochastic': draw each decision (seeded per session).")
    policy_threshold: float = Field(0.5, ge=0, le=1, description="The quality/speed knob: higher serves fewer "
                                                                 "layer-steps (closer to exact), lower serves more.")
    policy_training: PolicyTrainingSettings = Field(default_factory=PolicyTrainingSettings,
                                                    description="How `attnplug controller train` trains a policy.")

    @model_validator(mode="after")
    def _training_terms_follow_calibration(self) -> "ControllerSettings":
        """A policy trained under another budget than the plan it starts from and is compared with would chase other
        terms: unless `policy_training.terms` is given, it is the calibration's."""
        if "terms" not in self.policy_training.model_fields_set:
            self.policy_training = self.policy_training.model_copy(
                update={"terms": [t.model_copy() for t in self.calibration.terms]})
        return self

    def check_semantics(self, ctx: CheckContext, section: str) -> None:
        """A plan or policy file the session would read at start must be a regular file (refused before any work)."""
        for fld, value, keep in (("plan", self.plan, ("checkpoint", "off")), ("policy", self.policy, ("off",))):
            if value not in keep and not Path(value).is_file():
                what = "a file written by `attnplug calibrate --plan-out`" if fld == "plan" else \
                    "a policy file written by `attnplug controller train`"
                ctx.problems.append(f"[{section}] {fld}: no {fld} file at {value!r} (give {' or '.join(map(repr, keep))} or "
                                    f"{what})")
