"""REINFORCE for the routing policy: reward = efficiency − weighted quality cost against the exact sample.

Host-agnostic: the trainer gets a `sample(key)` callable that samples episode `key`'s prompts from its noise
through a session whose policy gate the trainer steers (`PolicyGate.rollout` for the policy's stochastic
decisions, `PolicyGate.exact` for the reference). One episode:

1. the exact sample of `key` — sampled once and cached (per prompt and noise);
2. a rollout: every step the policy draws a Bernoulli action per eligible layer; the gate records inputs and
   actions;
3. cost = Σ weight · (term's share of its bound) of the rollout against the reference (calibration's scale,
   1.0 = one term at its bound), capped at `cost_cap` (the quality floor of the reward); share = served /
   eligible layer-steps;
4. reward: `lagrangian` — share − λ·cost, with λ raised by dual ascent while the mean cost is over
   `cost_budget`; `target_share` — −cost − share_weight·|share − target_share|.

An update averages `episodes_per_update` episodes — `rollouts_per_key` rollouts of each key drawn — with advantage
= (reward − baseline) / EMA reward scale; the baseline is the EMA of rewards, or with several rollouts of a key the
mean reward of that key's other rollouts (leave-one-out: the prompts' own difficulty cancels);
loss = −mean(advantage · Σ log π(a)) / steps − entropy · mean Bernoulli entropy over eligible decisions; the
log-probabilities are recomputed with gradients from the recorded inputs, from the same distribution the
actions were drawn from. Gradients are clipped, AdamW steps. Metrics go to the session's loggers (scope
`controller/policy`), progress to a tqdm bar.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ...core.quality import QualityTerm, Sample, mean_scores
from .calibrate import cost_of
from .plan import ServingPlan
from .policy import RoutingPolicy, distribution
from .policy_checkpoint import TrainingState, restore_optimizer
from .policy_gate import PolicyGate, StepRecord
from .settings import PolicyTrainingSettings

SampleFn = Callable[[int], Sample]


@dataclass
class Episode:
    """One rollout: its key, the quality cost (capped), the share served, the term scores and the steps."""

    key: int
    cost: float
    share: float
    scores: dict[str, float]
    records: list[StepRecord]


@dataclass
class TrainResult:
    updates: int
    episodes: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


class ReinforceTrainer:
    """Trains `policy` through `gate` (the session's policy gate) against `terms` (see the module docstring)."""

    def __init__(self, policy: RoutingPolicy, gate: PolicyGate, terms: list[QualityTerm],
                 settings: PolicyTrainingSettings, state: TrainingState | None = None,
                 start_plan: ServingPlan | None = None) -> None:
        if len(terms) != len(settings.terms):
            raise ValueError(f"ReinforceTrainer: {len(terms)} terms for {len(settings.terms)} budgets")
        self.policy, self.gate, self.terms, self.settings = policy, gate, terms, settings
        with torch.inference_mode(False):
            self.optimizer = torch.optim.AdamW(policy.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        state = state or TrainingState(lagrange=settings.lambda_init)
        if state.optimizer:
            restore_optimizer(self.optimizer, state.optimizer, "routing policy training state")
        self.baseline, self.scale = state.baseline, state.reward_scale
        self.lagrange, self.updates, self.episodes = state.lagrange, state.updates, state.episodes
        self.rng = random.Random(settings.seed * 1_000_003 + self.episodes)
        gate.generator.manual_seed(settings.seed + 7919 * (self.episodes + 1))
        self.references: dict[int, Sample] = {}
        self.reference_runs = 0
        #: fit to this plan before the first update (plan_start.py); None: start as the policy is
        self.start_plan = start_plan
        self.start_agreement: float | None = None

    # ---- episodes ---------------------------------------------------------------------------------
    def reference(self, sample: SampleFn, key: int) -> Sample:
        """The exact sample of `key` (sampled once, then cached)."""
        ref = self.references.get(key)
        if ref is None:
            with self.gate.exact():
                try:
                    ref = sample(key)
                finally:
                    self.gate.session.run_end()
            self.references[key] = ref
            self.reference_runs += 1
        return ref

    def episode(self, sample: SampleFn, key: int) -> Episode:
        """One rollout of `key` under the policy's stochastic decisions, scored against its exact sample."""
        reference = self.reference(sample, key)
        self.gate.set_policy(self.policy)
        with self.gate.rollout() as trace:
            try:
                candidate = sample(key)
            finally:
                self.gate.session.run_end()
        scores = mean_scores(self.terms, candidate, reference)
        cost = cost_of(scores, self.terms, self.settings.terms)
        cost = self.settings.cost_cap if not math.isfinite(cost) else min(cost, self.settings.cost_cap)
        eligible = sum(float(r.eligible.sum()) for r in trace)
        served = sum(float(r.actions.sum()) for r in trace)
        self.episodes += 1
        return Episode(key, cost, served / eligible if eligible else 0.0, scores, list(trace))

    def reward(self, episode: Episode) -> float:
        s = self.settings
        if s.efficiency == "lagrangian":
            return episode.share - self.lagrange * episode.cost
        return -episode.cost - s.share_weight * abs(episode.share - s.target_share)

    # ---- one update -------------------------------------------------------------------------------
    def update(self, episodes: list[Episode]) -> dict[str, float]:
        """One policy-gradient step over `episodes`; returns its metrics (also logged)."""
        s = self.settings
        rewards = [self.reward(e) for e in episodes]
        mean_r = sum(rewards) / len(rewards)
        if self.baseline is None:
            self.baseline = mean_r
            spread = math.sqrt(sum((r - mean_r) ** 2 for r in rewards) / len(rewards))
            self.scale = spread if spread > 1e-6 else 1.0
        scale = max(self.scale or 1.0, 1e-3)
        k = s.rollouts_per_key
        baselines = leave_one_out(rewards, k) if k > 1 else [self.baseline] * len(rewards)
        advantages = [(r - b) / scale for r, b in zip(rewards, baselines)]
        with torch.inference_mode(False), torch.enable_grad():
            loss, entropy, decisions = self._loss(episodes, advantages)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), s.grad_clip))
            self.optimizer.step()
        d = s.baseline_decay
        deviation = sum((r - b) ** 2 for r, b in zip(rewards, baselines)) / len(rewards)
        self.scale = math.sqrt(d * scale ** 2 + (1 - d) * deviation)
        self.baseline = d * self.baseline + (1 - d) * mean_r
        mean_cost = sum(e.cost for e in episodes) / len(episodes)
        if s.efficiency == "lagrangian":
            self.lagrange = min(max(self.lagrange + s.lambda_lr * (mean_cost - s.cost_budget), 0.0), s.lambda_max)
        self.updates += 1
        metrics = {"reward": mean_r, "baseline": self.baseline, "cost": mean_cost,
                   "share_served": sum(e.share for e in episodes) / len(episodes), "lambda": self.lagrange,
                   "entropy": entropy, "loss": float(loss.detach()), "grad_norm": grad_norm,
                   "decisions": float(decisions), "episodes": float(self.episodes),
                   **{k: sum(e.scores[k] for e in episodes) / len(episodes) for k in episodes[0].scores}}
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        self.gate.session.loggers.log_metrics(finite, self.updates, "controller/policy")
        return metrics

    def _loss(self, episodes: list[Episode], advantages: list[float]) -> tuple[torch.Tensor, float, int]:
        policy_term = torch.zeros(())
        entropy_sum = torch.zeros(())
        decisions = 0
        for episode, adv in zip(episodes, advantages):
            if not episode.records:
                continue
            scalars = torch.stack([r.scalars for r in episode.records]).clone()
            texts = None
            if self.policy.use_text:
                texts = torch.stack([r.text for r in episode.records]).clone()  # type: ignore[misc]
            actions = torch.stack([r.actions for r in episode.records]).clone()
            mask = torch.stack([r.eligible for r in episode.records]).clone().float()
            dist = distribution(self.policy(scalars, texts).float().cpu())
            log_prob = (dist.log_prob(actions) * mask).sum() / len(episode.records)
            policy_term = policy_term - adv * log_prob
            entropy_sum = entropy_sum + (dist.entropy() * mask).sum()
            decisions += int(mask.sum())
        mean_entropy = entropy_sum / max(decisions, 1)
        loss = policy_term / len(episodes) - self.settings.entropy * mean_entropy
        return loss, float(mean_entropy.detach()), decisions

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self, sample: SampleFn, *, updates: int | None = None, minutes: float | None = None,
              progress: bool = True, on_update: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
        """Update until `updates` updates are done or `minutes` have passed (at least one of them is needed)."""
        if updates is None and minutes is None:
            raise ValueError("ReinforceTrainer.train: give updates, minutes or both")
        t0 = time.perf_counter()
        deadline = t0 + 60.0 * minutes if minutes is not None else math.inf
        result = TrainResult(0, 0, 0.0)
        bar = tqdm(total=updates, desc="policy", unit="update", dynamic_ncols=True, disable=not progress)
        try:
            if self.start_plan is not None:
                self.start_from(self.start_plan, sample)
            s = self.settings
            while (updates is None or result.updates < updates) and time.perf_counter() < deadline:
                keys = [key for _ in range(s.episodes_per_update // s.rollouts_per_key)
                        for key in [self.rng.randrange(s.pool)] * s.rollouts_per_key]
                metrics = self.update([self.episode(sample, k) for k in keys])
                result.updates += 1
                result.episodes += len(keys)
                result.history.append(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", share=f"{metrics['share_served']:.2f}",
                                cost=f"{metrics['cost']:.2f}", lam=f"{metrics['lambda']:.2f}")
                if on_update is not None:
                    on_update(metrics)
        finally:
            bar.close()
            self.gate.set_policy(None)
        result.seconds = time.perf_counter() - t0
        return result

    def start_from(self, plan: ServingPlan, sample: SampleFn) -> float:
        """Fit the policy to `plan` on the steps of one rollout (the host's real inputs), once; returns the share
        of eligible decisions it then makes as the plan does (also logged)."""
        from .plan_start import imitate_plan

        records = self.episode(sample, self.rng.randrange(self.settings.pool)).records
        self.start_agreement = imitate_plan(self.policy, plan, records, steps=self.settings.start_steps)
        self.start_plan = None
        self.gate.session.loggers.log_metrics({"start_agreement": self.start_agreement}, self.updates,
                                              "controller/policy")
        return self.start_agreement

    def state(self) -> TrainingState:
        """What `policy_checkpoint.save_policy` stores to resume from."""
        from .policy_checkpoint import flatten_optimizer

        return TrainingState(flatten_optimizer(self.optimizer), self.baseline, self.scale, self.lagrange,
                             self.updates, self.episodes)


def leave_one_out(rewards: list[float], k: int) -> list[float]:
    """Each reward's baseline: the mean of the other k − 1 rewards of its group (consecutive groups of k, the
    rollouts of one key)."""
    if k < 2 or len(rewards) % k:
        raise ValueError(f"leave_one_out: {len(rewards)} rewards in groups of {k}")
    out = []
    for g in range(0, len(rewards), k):
        group = rewards[g:g + k]
        total = sum(group)
        out += [(total - r) / (k - 1) for r in group]
    return out


def settings_json(settings: PolicyTrainingSettings) -> dict[str, Any]:
    """The training settings as stored in a policy file."""
    return settings.model_dump(mode="json")
