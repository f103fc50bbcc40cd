"""The policy gate: a learned routing policy decides, once per sampler step, which layers serve approximately.

At the first call of a new (run, step) the gate builds that step's `PolicyInputs` (σ, step fraction, guidance,
latent grid from the call; the pooled text embedding the host offered), asks the policy for every layer's
logit in one forward, and caches the decision vector; every later call of the step (any layer, cond or uncond)
reads the cache — the policy never runs on the per-call path, and the router caches the gate's answer per
(step, layer) on top of that. Only eligible layers can be served: ready for the configured learned backend
and not found non-finite; an eligible layer that the policy does not know, a step without the text embedding
a text-reading policy needs, or a policy that raises, vetoes (fail-closed).

Modes: `threshold` serves where P(serve) >= threshold (the quality/speed knob), `stochastic` draws each
decision. While training, `rollout()` switches to stochastic draws and records every step
(`StepRecord`), and `exact()` vetoes everything (the reference samples).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from ...core.backend import LearnedBackend
from ...core.call import AttentionCall, infer_grid
from ...core.conditioning import pool_text
from ...core.gates import ALLOW, GateDecision, veto
from .policy import PolicyInputs, RoutingPolicy, features

if TYPE_CHECKING:
    from ...core.session import Session

log = logging.getLogger("attnplug")

MODES = ("threshold", "stochastic")


@dataclass
class StepRecord:
    """One step of a rollout: what the policy saw and what it did (CPU tensors, no graph)."""

    scalars: torch.Tensor  # [N_SCALARS]
    text: torch.Tensor | None  # [D]
    actions: torch.Tensor  # [L] float 0/1, already masked by `eligible`
    eligible: torch.Tensor  # [L] bool


class PolicyGate:
    """Serves the layers the routing policy chooses at each step; allows everything while it has no policy."""

    name = "policy"

    def __init__(self, session: "Session", policy: RoutingPolicy | None = None, mode: str = "threshold",
                 threshold: float = 0.5, seed: int = 0, source: str = "") -> None:
        self.session = session
        self.policy: RoutingPolicy | None = None
        self.mode, self.threshold, self.source = "threshold", 0.5, source
        self.generator = torch.Generator().manual_seed(seed)
        self.trace: list[StepRecord] | None = None
        self.force_exact = False
        self.policy_calls = 0  # policy forwards (one per step while serving)
        self._step: tuple[object, ...] | None = None
        self._served: dict[str, bool] = {}
        self._why = ""
        self._text_src: torch.Tensor | None = None
        self._text: torch.Tensor | None = None
        self.set_policy(policy, mode, threshold, source)

    # ---- configuration ---------------------------------------------------------------------------
    def set_policy(self, policy: RoutingPolicy | None, mode: str | None = None, threshold: float | None = None,
                   source: str | None = None) -> None:
        """Serve through `policy` (None: the gate stands aside); decisions of the current step are recomputed."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"policy mode {mode!r}: expected one of {MODES}")
        if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"policy threshold {threshold!r}: expected a number in [0, 1]")
        self.policy = policy
        self.mode = mode or self.mode
        self.threshold = self.threshold if threshold is None else float(threshold)
        self.source = self.source if source is None else source
        self.invalidate()

    @property
    def active(self) -> bool:
        """True while a policy decides (the serving plan then stands aside)."""
        return self.policy is not None or self.force_exact

    def invalidate(self) -> None:
        self._step = None
        self.session.router.invalidate()

    @contextmanager
    def rollout(self) -> Iterator[list[StepRecord]]:
        """Stochastic decisions, every step recorded into the yielded list (training episodes)."""
        mode, self.mode, self.trace = self.mode, "stochastic", []
        self.invalidate()
        try:
            yield self.trace
        finally:
            self.mode, self.trace = mode, None
            self.invalidate()

    @contextmanager
    def exact(self) -> Iterator[None]:
        """Every call exact (the reference sample of a prompt and noise)."""
        self.force_exact = True
        self.invalidate()
        try:
            yield
        finally:
            self.force_exact = False
            self.invalidate()

    # ---- the gate ---------------------------------------------------------------------------------
    def decide(self, call: AttentionCall) -> GateDecision:
        if self.force_exact:
            return veto("exact reference sample")
        if self.policy is None:
            return ALLOW
        if call.layer_key not in self.policy.index:
            self.session.warn_once(call.layer_key, "policy:layer", f"routing policy {self.source}: layer "
                                   f"{call.layer_key} is not one of its {len(self.policy.layers)} layers; it stays "
                                   "exact")
            return veto(f"policy: {call.layer_key} is not one of the policy's layers")
        run = self.session.run
        key = (run.index if run is not None else -1, call.step_index, call.sigma)
        if key != self._step:
            self._step = key
            self._served, self._why = self._decide_step(call)
        if self._served.get(call.layer_key, False):
            return ALLOW
        return veto(self._why or f"policy: {call.layer_key} stays exact at this step")

    def _decide_step(self, call: AttentionCall) -> tuple[dict[str, bool], str]:
        policy = self.policy
        assert policy is not None
        if call.sigma is None or not math.isfinite(call.sigma):
            return {}, "policy: σ unknown (the policy decides by σ; fail-closed)"
        text = self._text_now() if policy.use_text else None
        if policy.use_text:
            if text is None:
                self.session.warn_once("-", "policy:text", "the routing policy reads the pooled text embedding, "
                                       "which this host offered none of; every call stays exact")
                return {}, "policy: no text embedding offered (fail-closed)"
            if text.shape[-1] != policy.text_dim:
                self.session.warn_once("-", "policy:text-dim", f"the routing policy reads text embeddings of width "
                                       f"{policy.text_dim}, the host offers {text.shape[-1]}; every call stays exact "
                                       "(was it trained on another model?)")
                return {}, "policy: text embedding of another width (fail-closed)"
        grid = call.latent_grid or infer_grid(call.n_image_tokens)
        if grid is None:
            side = math.sqrt(max(call.n_image_tokens, 1))
            grid = (side, side)  # type: ignore[assignment]
        frac = (call.step_index / max(call.num_steps - 1, 1)
                if call.step_index is not None and call.num_steps else None)
        inputs = PolicyInputs(float(call.sigma), frac, call.cfg_scale, grid[0], grid[1], text)
        scalars = features(inputs)
        eligible = torch.tensor([self._eligible(k) for k in policy.layers], dtype=torch.bool)
        try:
            with torch.no_grad():
                p = torch.sigmoid(policy(scalars[None], text[None] if text is not None else None)[0])
            p = p.float().cpu()
        except Exception as exc:  # noqa: BLE001 - a policy that fails vetoes, like any gate
            self.session.warn_once("-", "policy:error", f"the routing policy failed: {type(exc).__name__}: {exc}; "
                                   "every call stays exact")
            return {}, f"policy failed: {type(exc).__name__}"
        self.policy_calls += 1
        if self.mode == "stochastic":
            actions = torch.bernoulli(p, generator=self.generator)
        else:
            actions = (p >= self.threshold).float()
        actions = actions * eligible.float()
        if self.trace is not None:
            self.trace.append(StepRecord(scalars, text, actions, eligible))
        return {k: bool(a) for k, a in zip(policy.layers, actions.tolist())}, ""

    def _eligible(self, layer_key: str) -> bool:
        """Ready for the configured learned backend and not found non-finite (a readiness error: not eligible)."""
        backend = self.session.primary
        if not isinstance(backend, LearnedBackend) or layer_key in self.session._nonfinite_layers:
            return False
        try:
            return bool(backend.is_ready(layer_key))
        except Exception:  # noqa: BLE001 - the router reports a failing readiness check itself
            return False

    def _text_now(self) -> torch.Tensor | None:
        """The offered embedding pooled to `[D]` on the CPU; copied once per offered tensor (not per step)."""
        src = self.session.text_embedding
        if src is None:
            return None
        if src is not self._text_src:
            self._text_src, self._text = src, pool_text(src).cpu()
        return self._text

    def describe(self) -> str:
        """What this gate serves, for hosts to report (one line)."""
        if self.policy is None:
            return "routing policy: off"
        knob = f"threshold {self.threshold:g}" if self.mode == "threshold" else "stochastic"
        text = "with text features" if self.policy.use_text else "without text features"
        return (f"routing policy from {self.source or 'memory'} ({len(self.policy.layers)} layers, {text}, {knob}); "
                "it replaces the serving plan")


def policy_gate(session: "Session") -> PolicyGate | None:
    """The session's policy gate (the controller plugin adds one to every session), or None."""
    return next((g for g in session.router.gates if isinstance(g, PolicyGate)), None)


def attach_policy(session: "Session", policy: "RoutingPolicy | str | Path | None", layers: list[str] | None = None, *,
                  threshold: float | None = None, mode: str | None = None) -> PolicyGate:
    """Serve `session` through `policy` (a `RoutingPolicy` or a policy file; None keeps the configured one) — what
    hosts call when they know the model's layers: a policy (given, or from the config) for another layer set is
    refused with `PolicyLayersError`. `threshold` / `mode` override the config's knob."""
    from .policy_checkpoint import PolicyLayersError, load_policy

    gate = policy_gate(session)
    if gate is None:
        raise ValueError("the session has no policy gate (is the 'controller' plugin disabled?)")
    source = None
    if isinstance(policy, (str, Path)):
        source = str(policy)
        policy = load_policy(policy, layers).policy
    elif policy is None:
        policy = gate.policy
    if policy is not None and layers is not None and set(policy.layers) != set(layers):
        raise PolicyLayersError(Path(source or gate.source or "(in memory)"), policy.layers, layers)
    gate.set_policy(policy, mode=mode, threshold=threshold, source=source)
    return gate
