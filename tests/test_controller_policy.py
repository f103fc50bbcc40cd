"""The routing policy and its gate: unbiased Bernoulli actions, per-step decisions, readiness, modes, training."""
from __future__ import annotations

import pytest
import torch

from attnplug.core import AttentionCall, Session
from attnplug.core.quality import Sample
from attnplug.plugins.controller.calibrate import build_terms
from attnplug.plugins.controller.policy import N_SCALARS, PolicyInputs, RoutingPolicy, distribution, features
from attnplug.plugins.controller.policy_gate import policy_gate
from attnplug.plugins.controller.reinforce import ReinforceTrainer
from attnplug.plugins.controller.settings import PolicyTrainingSettings, TermBudget

SIGMAS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.05]
LAYERS = ["double:0", "single:0", "single:1"]
Q = torch.randn(1, 2, 12, 8)


def _call(layer: str, step: int, **kw) -> AttentionCall:
    kind, _, idx = layer.partition(":")
    return AttentionCall(layer_key=layer, block_type=kind, block_index=int(idx), sigma=SIGMAS[step], step_index=step,
                         num_steps=len(SIGMAS), n_cond_tokens=4, n_image_tokens=8, latent_grid=(2, 4), host="test",
                         **kw)


def _session(ready=tuple(LAYERS)) -> Session:
    session = Session({"backend": "ttr", "exact": "sdpa", "loggers": [],
                       "plugins": {"ttr": {"feature_dim": 16, "hidden": 0, "depth": 1}}})
    for layer in LAYERS:
        session.attention(Q, Q, Q, _call(layer, 0))
    session.run_end()
    for layer in ready:
        session.primary.ready[layer] = True
    return session


class ToyHost:
    """Every call goes through the session; serving double:0 at σ > 0.5 ruins the sample, the rest is harmless."""

    def __init__(self, session: Session, text: torch.Tensor | None = None) -> None:
        self.session, self.text, self.served = session, text, []

    def sample(self, key: int) -> Sample:
        served = set()
        for step in range(len(SIGMAS)):
            if self.text is not None:
                self.session.offer_text(self.text)
            for layer in LAYERS:
                call = _call(layer, step)
                self.session.attention(Q, Q, Q, call)
                if self.session.router.route(call, self.session.run.index).approximate:
                    served.add((layer, step))
        self.served.append(served)
        harm = sum(0.1 for layer, step in served if layer == "double:0" and SIGMAS[step] > 0.5)
        latent = torch.ones(1, 100)
        latent[0, 0] += 10 * harm  # relative RMSE = harm
        return Sample(latent=latent)


def test_actions_and_log_probs_come_from_one_bernoulli():
    logits = torch.tensor([-2.0, 0.0, 1.5])
    dist = distribution(logits)
    draws = torch.stack([torch.bernoulli(torch.sigmoid(logits)) for _ in range(20000)])
    assert draws.mean(0) == pytest.approx(torch.sigmoid(logits), abs=0.015)  # frequencies = sigmoid(logit)
    a = torch.tensor([1.0, 0.0, 1.0])
    by_hand = a * torch.nn.functional.logsigmoid(logits) + (1 - a) * torch.nn.functional.logsigmoid(-logits)
    assert torch.allclose(dist.log_prob(a), by_hand)  # log P(a) of the same distribution, no surrogate


def test_gradients_reach_every_input_branch():
    policy = RoutingPolicy(LAYERS, text_dim=5, hidden=8)
    scalars = torch.stack([features(PolicyInputs(s, i / 5, 3.5, 32, 48)) for i, s in enumerate(SIGMAS)])
    assert scalars.shape == (6, N_SCALARS) and scalars[0, -1] == pytest.approx(32 * 48 / 4096)
    logits = policy(scalars, torch.randn(6, 5))
    assert logits.shape == (6, 3) and torch.allclose(logits, torch.full_like(logits, 1.0))  # starts at init_logit
    distribution(logits).log_prob(torch.ones(6, 3)).sum().backward()
    assert all(p.grad is not None for p in policy.parameters())
    assert RoutingPolicy(LAYERS, text_dim=5, use_text=False).text_in is None  # the ablation: same class, no text


def test_decisions_are_made_once_per_step_and_unready_layers_are_never_served():
    session = _session(ready=("single:0", "single:1"))
    gate = policy_gate(session)
    policy = RoutingPolicy(LAYERS, init_logit=5.0)
    calls = []
    policy.register_forward_hook(lambda *a: calls.append(1))
    gate.set_policy(policy)
    host = ToyHost(session)
    host.sample(0)
    session.run_end()
    assert len(calls) == len(SIGMAS)  # one policy forward per step, not per call
    assert {layer for layer, _ in host.served[0]} == {"single:0", "single:1"}  # double:0 is not ready
    assert "policy" in " ".join(session.serving_notes())


def test_threshold_is_the_knob_and_stochastic_draws():
    session = _session()
    gate = policy_gate(session)
    policy = RoutingPolicy(LAYERS, init_logit=0.0)  # P(serve) = 0.5 everywhere
    host = ToyHost(session)
    for threshold, expected in ((0.4, 18), (0.6, 0)):
        gate.set_policy(policy, mode="threshold", threshold=threshold)
        host.sample(0)
        session.run_end()
        assert len(host.served[-1]) == expected
    gate.set_policy(policy, mode="stochastic")
    counts = []
    for _ in range(6):
        host.sample(0)
        session.run_end()
        counts.append(len(host.served[-1]))
    assert 0 < sum(counts) / len(counts) < 18 and len(set(counts)) > 1
    with pytest.raises(ValueError, match="threshold"):
        gate.set_policy(policy, threshold=1.5)


def test_a_text_policy_without_text_stays_exact():
    session = _session()
    gate = policy_gate(session)
    gate.set_policy(RoutingPolicy(LAYERS, text_dim=4, init_logit=5.0))
    host = ToyHost(session)
    host.sample(0)
    session.run_end()
    assert host.served[-1] == set()  # fail-closed
    host.text = torch.randn(2, 4)
    host.sample(0)
    session.run_end()
    assert len(host.served[-1]) == 18


def test_the_plan_stands_aside_while_a_policy_decides():
    from attnplug.plugins.controller.gate import plan_gate
    from attnplug.plugins.controller.plan import ServingPlan

    session = _session()
    plan_gate(session).candidate = None
    session.components["controller.plan"] = ({}, ServingPlan.from_cells([1.0, 0.0], []).to_json())
    host = ToyHost(session)
    host.sample(0)
    session.run_end()
    assert host.served[-1] == set()  # the empty plan serves nothing
    policy_gate(session).set_policy(RoutingPolicy(LAYERS, init_logit=5.0))
    host.sample(0)
    session.run_end()
    assert len(host.served[-1]) == 18


def test_reinforce_learns_to_keep_the_harmful_cells_exact():
    session = _session()
    gate = policy_gate(session)
    settings = PolicyTrainingSettings(terms=[TermBudget(kind="latent_rmse", max=0.1)], episodes_per_update=4,
                                      pool=2, lr=0.03, entropy=0.001, lambda_init=2.0, seed=1)
    terms = build_terms(settings.terms, session)
    policy = RoutingPolicy(LAYERS, hidden=16, init_logit=0.5)
    trainer = ReinforceTrainer(policy, gate, terms, settings)
    host = ToyHost(session)
    first = trainer.train(host.sample, updates=3, progress=False)
    result = trainer.train(host.sample, updates=50, progress=False)
    assert trainer.reference_runs == 2  # one exact sample per (prompt, noise) key, then cached
    early = sum(m["reward"] for m in first.history) / 3
    late = sum(m["reward"] for m in result.history[-5:]) / 5
    assert late > early
    gate.set_policy(policy, mode="threshold", threshold=0.5)
    host.sample(0)
    session.run_end()
    served = host.served[-1]
    harmful = {("double:0", s) for s in range(3)}
    assert not served & harmful
    assert len(served) >= 12  # the harmless cells serve (15 of them)


def test_a_new_policy_starts_from_the_serving_plan():
    """Before its first update, the trainer fits the policy to the calibrated plan on a rollout's steps, so REINFORCE
    starts where the plan is: at threshold 0.5 the policy then serves what the plan serves."""
    from attnplug.plugins.controller.plan import ServingPlan

    session = _session()
    gate = policy_gate(session)
    plan = ServingPlan.from_cells([1.0, 0.5, 0.0], [("single:0", 0), ("single:0", 1), ("single:1", 1)])
    settings = PolicyTrainingSettings(terms=[TermBudget(kind="latent_rmse", max=0.1)], episodes_per_update=1,
                                      pool=1, lr=1e-6, seed=3, start_steps=300)
    trainer = ReinforceTrainer(RoutingPolicy(LAYERS, hidden=16, init_logit=2.0), gate,
                               build_terms(settings.terms, session), settings, start_plan=plan)
    host = ToyHost(session)
    trainer.train(host.sample, updates=1, progress=False)  # the fit, then one (tiny-lr) update
    assert trainer.start_agreement == pytest.approx(1.0)
    assert trainer.start_plan is None  # once only: a later train() call goes on from here
    gate.set_policy(trainer.policy, mode="threshold", threshold=0.5)
    host.sample(0)
    session.run_end()
    expected = {(layer, step) for step, sigma in enumerate(SIGMAS) for layer in LAYERS if plan.allows(layer, sigma)}
    assert host.served[-1] == expected and expected


def test_imitation_is_masked_to_eligible_layers_and_needs_steps():
    from attnplug.plugins.controller.plan import ServingPlan
    from attnplug.plugins.controller.plan_start import imitate_plan
    from attnplug.plugins.controller.policy_gate import StepRecord

    policy = RoutingPolicy(LAYERS, hidden=8)
    plan = ServingPlan.from_cells([1.0, 0.0], [("double:0", 0)])
    with pytest.raises(ValueError, match="no recorded steps"):
        imitate_plan(policy, plan, [])
    records = [StepRecord(features(PolicyInputs(s)), None, torch.zeros(3), torch.tensor([True, False, True]))
               for s in SIGMAS]
    assert imitate_plan(policy, plan, records, steps=150) == pytest.approx(1.0)
    logits = policy(torch.stack([r.scalars for r in records]))
    assert bool((logits[:, 0] > 0).all()) and bool((logits[:, 2] < 0).all())


def test_policy_training_answers_to_the_calibration_budget_unless_its_own_terms_are_given():
    """A config that sets only the calibration's budget trains the policy under the same terms (the plan it starts
    from and is compared with answers to them); terms given for training are kept, and so is the rest."""
    from attnplug.plugins.controller.settings import ControllerSettings

    budget = [{"kind": "testbed_adherence", "max": 0.5}, {"kind": "velocity_fidelity", "max": 0.05, "weight": 0.5}]
    inherited = ControllerSettings.model_validate({"calibration": {"terms": budget}, "policy_training": {"lr": 0.01}})
    assert [t.model_dump() for t in inherited.policy_training.terms] == \
        [t.model_dump() for t in inherited.calibration.terms]
    assert inherited.policy_training.lr == 0.01
    own = [{"kind": "latent_rmse", "max": 0.2}]
    kept = ControllerSettings.model_validate({"calibration": {"terms": budget}, "policy_training": {"terms": own}})
    assert [(t.kind, t.max) for t in kept.policy_training.terms] == [("latent_rmse", 0.2)]
    again = ControllerSettings.model_validate(inherited.model_dump())  # a saved config reads back the same
    assert again.policy_training == inherited.policy_training


def test_leave_one_out_baselines_compare_rollouts_of_the_same_key():
    from attnplug.plugins.controller.reinforce import leave_one_out

    assert leave_one_out([1.0, 3.0, 10.0, 20.0], 2) == [3.0, 1.0, 20.0, 10.0]
    assert leave_one_out([0.0, 3.0, 6.0], 3) == [4.5, 3.0, 1.5]
    with pytest.raises(ValueError, match="5 rewards in groups of 2"):
        leave_one_out([0.0] * 5, 2)
    with pytest.raises(ValueError, match="must be a multiple of rollouts_per_key"):
        PolicyTrainingSettings(episodes_per_update=4, rollouts_per_key=3)


def test_rollouts_of_one_key_learn_with_leave_one_out_baselines():
    """Each update rolls every drawn key out k times in a row, and REINFORCE with the leave-one-out baseline
    still learns the toy task: harmful cells exact, the harmless ones served."""
    session = _session()
    gate = policy_gate(session)
    settings = PolicyTrainingSettings(terms=[TermBudget(kind="latent_rmse", max=0.1)], episodes_per_update=4,
                                      rollouts_per_key=2, pool=4, lr=0.03, entropy=0.001, lambda_init=2.0, seed=1)
    policy = RoutingPolicy(LAYERS, hidden=16, init_logit=0.5)
    trainer = ReinforceTrainer(policy, gate, build_terms(settings.terms, session), settings)
    keys: list[int] = []
    host = ToyHost(session)
    rollout = trainer.episode
    trainer.episode = lambda sample, key: (keys.append(key), rollout(sample, key))[1]
    trainer.train(host.sample, updates=50, progress=False)
    assert len(keys) == 200 and keys[0::2] == keys[1::2]  # each key twice in a row
    assert len(set(keys)) == 4
    gate.set_policy(policy, mode="threshold", threshold=0.5)
    host.sample(0)
    session.run_end()
    served = host.served[-1]
    assert not served & {("double:0", s) for s in range(3)}
    assert len(served) >= 12
