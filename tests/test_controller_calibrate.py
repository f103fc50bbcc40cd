"""Calibration's search on a host whose sample damage is known per (layer, σ band) cell."""
from __future__ import annotations

import json

import pytest
import torch

from attnplug.core import Session
from attnplug.core.quality import Sample
from attnplug.plugins.controller.calibrate import CalibrationError, Calibrator, build_terms, calibrate
from attnplug.plugins.controller.settings import CalibrationSettings, TermBudget

SIGMAS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.05]  # bands [1, 0.5, 0]: 3 steps each
LAYERS = ["double:0", "single:0", "single:1"]


class KnownDamage:
    """A host: every call goes through the session; each served (layer, step) adds its known damage to the
    latent, plus `pair_extra` when both cells of `pair` are served (an interaction)."""

    def __init__(self, session, damage, pair=None, pair_extra=0.0):
        self.session, self.damage, self.pair, self.pair_extra = session, damage, pair, pair_extra
        self.q = torch.randn(1, 2, 24, 16)
        self.calls = 0

    def sample(self) -> Sample:
        served = set()
        for step, sigma in enumerate(SIGMAS):
            for layer in LAYERS:
                kind, _, idx = layer.partition(":")
                from attnplug.core import AttentionCall

                call = AttentionCall(layer_key=layer, block_type=kind, block_index=int(idx), sigma=sigma,
                                     step_index=step, num_steps=len(SIGMAS), n_cond_tokens=8, n_image_tokens=16,
                                     host="test")
                self.session.attention(self.q, self.q, self.q, call)
                if self.session.router.route(call, self.session.run.index).approximate:
                    served.add((layer, 0 if sigma > 0.5 else 1))
        self.calls += 1
        harm = sum(self.damage.get(c, 0.0) for c in served)
        if self.pair and set(self.pair) <= served:
            harm += self.pair_extra
        latent = torch.ones(1, 100)
        latent[0, 0] += harm * 10  # relative RMSE = harm
        return Sample(latent=latent)


def _session(ready=("single:0", "single:1", "double:0")):
    session = Session({"backend": "ttr", "exact": "sdpa"})
    q = torch.randn(1, 2, 24, 16)
    from attnplug.core import AttentionCall

    for layer in LAYERS:
        kind, _, idx = layer.partition(":")
        session.attention(q, q, q, AttentionCall(layer_key=layer, block_type=kind, block_index=int(idx), sigma=1.0,
                                                 n_cond_tokens=8, n_image_tokens=16, host="test"))
    session.run_end()
    for layer in ready:
        session.primary.ready[layer] = True
    return session


def _settings(bound=0.1, **kw):
    return CalibrationSettings(sigma_bands=[1.0, 0.5, 0.0], terms=[TermBudget(kind="latent_rmse", max=bound)], **kw)


def test_greedy_keeps_the_cumulative_plan_within_budget_in_order_of_cost():
    session = _session()
    damage = {("single:0", 0): 0.01, ("single:0", 1): 0.0, ("single:1", 0): 0.05, ("single:1", 1): 0.02,
              ("double:0", 0): 0.5, ("double:0", 1): 0.04}
    host = KnownDamage(session, damage)
    result = calibrate(session, host, _settings(bound=0.1, second_pass=False), progress=False)
    # cheapest first: s0/1 (0), s0/0 (.01), s1/1 (.02), d0/1 (.04) → 0.07; s1/0 (.05) would make .12 > .1;
    # d0/0 is over budget alone and is never sampled with the others
    assert result.plan.cell_list() == [("double:0", 1), ("single:0", 0), ("single:0", 1), ("single:1", 1)]
    assert result.final_scores["latent_rmse"] == pytest.approx(0.07, abs=1e-6)
    assert result.runs == 1 + 6 + 4  # reference, six cells alone, four cumulative checks (first reuses its alone run)
    assert host.calls == result.runs
    report = result.plan.report
    assert report["share_served"] == pytest.approx(4 * 3 / (3 * 6))
    rejected = {(s["layer"], s["band"]): s["reason"] for s in report["search"] if not s["accepted"]}
    assert "over budget alone" in rejected[("double:0", 0)] and "cumulative" in rejected[("single:1", 0)]
    json.dumps(result.plan.to_json())  # the report is JSON-able
    assert result.plan.fingerprint and result.plan.backend == "ttr"
    assert session.training is False and session.router.gates[-1].candidate is None  # steering undone


def test_second_pass_retries_cells_an_interaction_rejected():
    # serving single:1's high-noise band together with single:0's repairs part of the damage (layer errors
    # interact through the trajectory): single:0 band 1 is refused first, and fits once single:1 band 0 is in
    damage = {("single:0", 0): 0.05, ("single:0", 1): 0.055, ("single:1", 0): 0.07, ("single:1", 1): 0.5,
              ("double:0", 0): 0.5, ("double:0", 1): 0.5}
    pair = [("single:0", 0), ("single:1", 0)]
    once = _session()
    first = calibrate(once, KnownDamage(once, damage, pair, -0.1), _settings(second_pass=False), progress=False)
    assert first.plan.cell_list() == [("single:0", 0), ("single:1", 0)]
    twice = _session()
    second = calibrate(twice, KnownDamage(twice, damage, pair, -0.1), _settings(second_pass=True), progress=False)
    assert second.plan.cell_list() == [("single:0", 0), ("single:0", 1), ("single:1", 0)]
    assert second.final_scores["latent_rmse"] == pytest.approx(0.075, abs=1e-6)


def test_layers_not_ready_or_filtered_out_never_enter_the_plan():
    session = _session(ready=("single:0",))
    host = KnownDamage(session, {})
    result = calibrate(session, host, _settings(layers=["*"]), progress=False)
    assert {layer for layer, _ in result.plan.cell_list()} == {"single:0"}
    other_session = _session()
    result2 = calibrate(other_session, KnownDamage(other_session, {}), _settings(layers=["double:*"]), progress=False)
    assert {layer for layer, _ in result2.plan.cell_list()} == {"double:0"}
    with pytest.raises(CalibrationError, match="no layer is eligible"):
        calibrate(other_session, KnownDamage(other_session, {}), _settings(layers=["single:7"]), progress=False)


def test_bad_budgets_are_refused_before_any_sampling():
    session = _session()
    with pytest.raises(CalibrationError, match="unknown quality term.*latent_rmse"):
        build_terms([TermBudget(kind="nope", max=1.0)], session)
    with pytest.raises(CalibrationError, match="higher-is-better.*`min`"):
        build_terms([TermBudget(kind="trajectory_psnr", max=1.0)], session)
    with pytest.raises(CalibrationError, match="takes no options"):
        build_terms([TermBudget(kind="latent_rmse", max=1.0, options={"x": 1})], session)
    with pytest.raises(ValueError, match="exactly one of"):
        TermBudget(kind="latent_rmse")
    with pytest.raises(ValueError, match="strictly decreasing"):
        CalibrationSettings(sigma_bands=[0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="last edge must be 0"):
        CalibrationSettings(sigma_bands=[1.0, 0.5])
    exact = Session({"backend": "sdpa"})
    with pytest.raises(CalibrationError, match="learned approximate backend"):
        Calibrator(exact, KnownDamage(exact, {}), _settings(), [])
