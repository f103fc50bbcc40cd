"""Start a routing policy where the calibrated serving plan is (behaviour cloning before REINFORCE).

A policy that starts from scratch spends its first updates finding out what calibration already measured —
which (layer, σ band) cells break the image. `imitate_plan` fits the policy's decisions to the plan's on the
steps of a rollout (the inputs the host really gives: σ, step fraction, guidance, grid, text) with a
cross-entropy loss, towards soft targets (P(serve) = sigmoid(±margin)) so that REINFORCE still explores from
there. The trainer does this once, before its first update, when the session has a plan and training is not
resumed; the policy then has only to improve on the plan, the baseline it is measured against.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .plan import ServingPlan
from .policy import RoutingPolicy
from .policy_gate import StepRecord


def plan_targets(policy: RoutingPolicy, plan: ServingPlan, records: Sequence[StepRecord]) -> torch.Tensor:
    """`[S, L]` float: 1 where the plan serves layer l at the σ of step s (the first scalar feature), else 0."""
    sigmas = [float(r.scalars[0]) for r in records]
    return torch.tensor([[1.0 if plan.allows(layer, s) else 0.0 for layer in policy.layers] for s in sigmas])


def imitate_plan(policy: RoutingPolicy, plan: ServingPlan, records: Sequence[StepRecord], *, steps: int = 200,
                 lr: float = 1e-2, margin: float = 2.0) -> float:
    """Fit `policy` to the plan's decisions on `records`' steps (eligible layers only); returns the share of those
    decisions the policy then makes as the plan does (at threshold 0.5)."""
    if not records:
        raise ValueError("imitate_plan: no recorded steps to imitate on")
    scalars = torch.stack([r.scalars for r in records]).float()
    texts = torch.stack([r.text for r in records]).float() if policy.use_text else None  # type: ignore[misc]
    mask = torch.stack([r.eligible for r in records]).float()
    hard = plan_targets(policy, plan, records)
    p = 1.0 / (1.0 + math.exp(-margin))
    soft = hard * p + (1.0 - hard) * (1.0 - p)
    with torch.inference_mode(False), torch.enable_grad():
        optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
        for _ in range(steps):
            logits = policy(scalars, texts).float().cpu()
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, soft, reduction="none") * mask
                    ).sum() / mask.sum().clamp_min(1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            agree = ((policy(scalars, texts).float().cpu() >= 0).float() == hard).float()
    return float((agree * mask).sum() / mask.sum().clamp_min(1.0))
