"""The job behind `attnplug controller train`: a session, a host's episodes, the trainer, the policy file.

Host-agnostic like calibration: `make_sampler(session, settings)` returns the host's episode sampler, an object
whose `sample(key)` samples episode `key`'s prompts from its noise through the session (and optionally
`close()`). One exact probe run tells the trainer which layers the model has and how wide the host's pooled
text embedding is, so the policy is built for exactly that model (every layer, joint blocks too).
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from ...core.quality import Sample
from .calibrate import TermFactory, build_terms
from .gate import plan_gate
from .plan import ServingPlan
from .policy import RoutingPolicy
from .policy_checkpoint import load_policy, save_policy
from .policy_gate import PolicyGate, policy_gate
from .reinforce import ReinforceTrainer, settings_json
from .settings import PolicyTrainingSettings

if TYPE_CHECKING:
    from ...core.session import Session

log = logging.getLogger("attnplug")


class EpisodeSampler(Protocol):
    """Samples the prompts of episode `key` from the noise of episode `key`, through the session."""

    def sample(self, key: int) -> Sample: ...


class PolicyTrainingError(ValueError):
    """Training cannot run (no learned backend, no eligible layer, no controller plugin)."""


def layer_order(key: str) -> tuple[Any, ...]:
    """Double blocks, then single blocks, by index (`double:2` before `double:10`), then anything else."""
    kind, _, rest = key.partition(":")
    m = re.match(r"(\d+)", rest)
    return ({"double": 0, "single": 1}.get(kind, 2), kind, int(m.group(1)) if m else -1, key)


def probe(session: "Session", gate: PolicyGate, sample: Callable[[int], Sample]) -> tuple[Sample, list[str], int | None]:
    """Episode 0 sampled exact: its sample, the model's attention layers, and the text embedding's width."""
    with gate.exact():
        try:
            reference = sample(0)
        finally:
            session.run_end()
    layers = sorted(session.stats, key=layer_order)
    if not layers:
        raise PolicyTrainingError("the probe run made no attention call through attnplug (is the model patched?)")
    text = session.text_embedding
    return reference, layers, (int(text.shape[-1]) if text is not None else None)


def build_trainer(session: "Session", sample: Callable[[int], Sample], settings: PolicyTrainingSettings, *,
                  resume: str | Path | None = None, extra_terms: Mapping[str, TermFactory] | None = None,
                  start_plan: ServingPlan | None = None) -> ReinforceTrainer:
    """A trainer for `session`'s model: a new policy (or the one in `resume`, with its optimizer, baseline and λ),
    the reward terms of `settings`, episode 0's exact sample already cached. A new policy starts from `start_plan`
    (default: the session's serving plan, if any) when `settings.start_from_plan`."""
    gate = policy_gate(session)
    if gate is None:
        raise PolicyTrainingError("the session has no policy gate (is the 'controller' plugin disabled?)")
    eligible_backend = session.primary
    if not session.learned_backends() or session.primary.capabilities.exact:
        raise PolicyTrainingError(f"training a routing policy needs a learned approximate backend as the config's "
                                  f"`backend`, got {session.config.root.backend!r}")
    terms = build_terms(settings.terms, session, extra_terms)
    reference, layers, text_dim = probe(session, gate, sample)
    ready = [k for k in layers if eligible_backend.is_ready(k)]
    if not ready:
        raise PolicyTrainingError(f"no layer of {layers} is ready for backend {session.config.root.backend!r}: "
                                  "nothing to route (distill the checkpoint first)")
    if resume is not None:
        loaded = load_policy(resume, layers)
        policy, state = loaded.policy, loaded.training
        if state is None:
            raise PolicyTrainingError(f"routing policy {resume} holds no training state (optimizer, baseline); it "
                                      "was not written by the trainer and cannot be resumed")
        if policy.use_text != settings.use_text:
            log.warning("attnplug: resuming routing policy %s, which was trained %s text features: it goes on that way "
                        "(use_text = %s is ignored)", resume, "with" if policy.use_text else "without",
                        str(settings.use_text).lower())
        if policy.use_text and policy.text_dim != text_dim:
            raise PolicyTrainingError(f"routing policy {resume} reads text embeddings of width {policy.text_dim}, "
                                      f"this host offers {text_dim}")
    else:
        if settings.use_text and text_dim is None:
            raise PolicyTrainingError("use_text = true, but this host offers no pooled text embedding (set "
                                      "[plugins.controller.policy_training] use_text = false)")
        policy = RoutingPolicy(layers, text_dim if settings.use_text else None, use_text=settings.use_text,
                               hidden=settings.hidden, init_logit=settings.init_logit)
        state = None
    if resume is None and settings.start_from_plan and start_plan is None:
        planner = plan_gate(session)
        start_plan = planner.plan() if planner is not None else None
    trainer = ReinforceTrainer(policy, gate, terms, settings, state,
                               start_plan=start_plan if resume is None and settings.start_from_plan else None)
    trainer.references[0] = reference
    trainer.reference_runs += 1
    return trainer


def run_policy_training(config: Any, checkpoint: Any, make_sampler: Callable[["Session", PolicyTrainingSettings], Any],
                        *, policy_out: str | Path, minutes: float | None = None, updates: int | None = None,
                        resume: str | Path | None = None, use_text: bool | None = None,
                        extra_terms: Mapping[str, TermFactory] | None = None, progress: bool = True) -> dict[str, Any]:
    """Load `config` (training off) and the learned `checkpoint`, train a policy on the host's episodes, write it to
    `policy_out` (weights, optimizer, baseline, settings). Returns a report (JSON-able)."""
    from ...core import Session
    from ...core.config import load_config

    if minutes is None and updates is None:
        raise PolicyTrainingError("give --minutes, --updates or both")
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise PolicyTrainingError(f"--minutes must be a positive number, got {minutes}")
    if updates is not None and updates < 1:
        raise PolicyTrainingError(f"--updates must be >= 1, got {updates}")
    cfg = load_config(config)
    cfg.root = cfg.root.model_copy(update={"training": False, "checkpoint": None})
    settings: PolicyTrainingSettings = cfg.sections["controller"].policy_training  # type: ignore[attr-defined]
    if use_text is not None:
        settings = settings.model_copy(update={"use_text": use_text})
    session = Session(cfg)
    sampler = None
    try:
        if checkpoint is not None:
            session.load(checkpoint)
        sampler = make_sampler(session, settings)
        trainer = build_trainer(session, sampler.sample, settings, resume=resume, extra_terms=extra_terms)
        result = trainer.train(sampler.sample, updates=updates, minutes=minutes, progress=progress)
        saved = save_policy(policy_out, trainer.policy, settings_json(settings), trainer.state())
    finally:
        close = getattr(sampler, "close", None)
        if callable(close):
            close()
        session.close()
    last = result.history[-1] if result.history else {}
    return {"policy": str(saved), "layers": trainer.policy.layers, "use_text": trainer.policy.use_text,
            "text_dim": trainer.policy.text_dim, "updates": trainer.updates, "episodes": trainer.episodes,
            "reference_runs": trainer.reference_runs, "seconds": round(result.seconds, 2), "final": last}


def describe(report: Mapping[str, Any]) -> str:
    """One paragraph for the console."""
    f = report.get("final", {})
    text = f"with text features ({report['text_dim']} wide)" if report["use_text"] else "without text features"
    return (f"routing policy for {len(report['layers'])} layers {text}: {report['updates']} updates, "
            f"{report['episodes']} episodes ({report['reference_runs']} exact references) in {report['seconds']:.0f} s"
            + (f"; last update: reward {f['reward']:.3f}, share served {100 * f['share_served']:.1f} %, cost "
               f"{f['cost']:.3f}, λ {f['lambda']:.2f}" if f else "") + f"\nwritten to {report['policy']}")
