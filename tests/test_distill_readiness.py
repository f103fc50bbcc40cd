"""Readiness of the online distiller: EMA per run, hysteresis, one flush per run, fallbacks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from attnplug.core import AttentionCall
from attnplug.plugins.ttr.readiness import LayerReadiness, ReadinessRule

_spec = importlib.util.spec_from_file_location(
    "distill_fakes_r", Path(__file__).with_name("test_distill_fakes.py")
)
fk = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fk)  # type: ignore[union-attr]


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest)


def test_hysteresis_sequence():
    rule = ReadinessRule(threshold=0.1, min_updates=0, exit_factor=1.2, decay=0.9)
    ready, states = False, []
    for ema in (0.095, 0.11, 0.121, 0.11, 0.099):
        ready = rule.next_ready(ready, ema, updates=100)
        states.append(ready)
    assert states == [True, True, False, False, True]


def test_hysteresis_through_run_flushes():
    # decay 0: the EMA equals each run's mean, so the run means walk the documented sequence
    rule = ReadinessRule(threshold=0.1, min_updates=1, exit_factor=1.2, decay=0.0)
    r = LayerReadiness()
    states = []
    for value in (0.095, 0.11, 0.121, 0.11, 0.099):
        for _ in range(3):
            r.record(loss=0.5, cos_dist=value)
        r.flush(rule)
        assert r.ema_cos == pytest.approx(value)
        states.append(r.ready)
    assert states == [True, True, False, False, True]


def test_ema_first_value_is_run_mean_then_decays():
    rule = ReadinessRule(threshold=0.1, min_updates=0, decay=0.9)
    r = LayerReadiness()
    for c in (0.2, 0.4):
        r.record(loss=1.0, cos_dist=c)
    r.flush(rule)
    assert r.ema_cos == pytest.approx(0.3) and r.ema_loss == pytest.approx(1.0)
    r.record(loss=0.0, cos_dist=0.0)
    r.flush(rule)
    assert r.ema_cos == pytest.approx(0.27) and r.ema_loss == pytest.approx(0.9)
    assert not r.flush(rule), "a flush with nothing accumulated changes nothing"
    assert r.flushes == 2


def test_min_updates_and_clamping():
    rule = ReadinessRule(threshold=0.1, min_updates=5, decay=0.0)
    r = LayerReadiness()
    for _ in range(4):
        r.record(loss=0.0, cos_dist=-0.5)  # clamped to 0
    r.flush(rule)
    assert r.ema_cos == 0.0 and not r.ready, "4 updates < min_updates 5"
    r.record(loss=0.0, cos_dist=0.0)
    r.flush(rule)
    assert r.ready
    assert not rule.next_ready(True, float("nan"), 100), "NaN is never ready"


def _count_layer_flushes(session):
    return {k: r.flushes for k, r in session.distiller.readiness.items()}


def test_exactly_one_flush_per_sampling_run_even_for_long_runs():
    # 30 steps x 1 update per step per layer > the periodic fallback of 20: still one flush per run
    s = fk.make_session({"flush_every": 20, "log_every": 0, "layer_log_every": 0, "query_cap": 16})
    gen = torch.Generator().manual_seed(0)
    fk.run_sampling(s, runs=3, steps=30, layers=["single:0", "single:1"], gen=gen, n=24)
    d = s.distiller
    assert dict(d.flush_counts) == {"run_end": 3}
    assert _count_layer_flushes(s) == {"single:0": 3, "single:1": 3}
    assert all(r.run_count == 0 for r in d.readiness.values())


def test_session_detected_runs_flush_once_each():
    # the host never reports runs: the session sees the step index go back and ends the run itself
    s = fk.make_session({"log_every": 0, "layer_log_every": 0, "query_cap": 16})
    gen = torch.Generator().manual_seed(1)
    for _run in range(3):
        for step in range(4):
            q, k, v = fk.make_qkv(gen, n=24)
            s.attention(
                q,
                k,
                v,
                AttentionCall(
                    "single:0",
                    "single",
                    0,
                    sigma=1 - step / 4,
                    step_index=step,
                    n_image_tokens=24,
                    host="test",
                ),
            )
    s.close()
    assert s.distiller.flush_counts["run_end"] == 3
    assert s.distiller.readiness["single:0"].flushes == 3


def test_sigma_jump_fallback_within_one_run():
    # a host whose step counter keeps rising across images: only the sigma jump shows the boundary
    s = fk.make_session({"log_every": 0, "layer_log_every": 0, "query_cap": 16})
    gen = torch.Generator().manual_seed(2)
    s.run_start()
    step = 0
    for _image in range(3):
        for sigma in (1.0, 0.6, 0.3, 0.1):
            q, k, v = fk.make_qkv(gen, n=24)
            s.attention(
                q,
                k,
                v,
                AttentionCall(
                    "single:0", "single", 0, sigma=sigma, step_index=step, n_image_tokens=24, host="test"
                ),
            )
            step += 1
    s.run_end()
    d = s.distiller
    assert d.flush_counts["sigma_jump"] == 2 and d.flush_counts["run_end"] == 1
    assert d.readiness["single:0"].flushes == 3


def test_periodic_fallback_without_steps_or_sigmas():
    s = fk.make_session({"flush_every": 5, "log_every": 0, "layer_log_every": 0, "query_cap": 16})
    gen = torch.Generator().manual_seed(3)
    s.run_start()
    for _ in range(12):
        q, k, v = fk.make_qkv(gen, n=24)
        s.attention(q, k, v, AttentionCall("single:0", "single", 0, n_image_tokens=24, host="test"))
    s.run_end()
    d = s.distiller
    assert d.flush_counts["periodic"] == 2  # after updates 5 and 10
    assert d.flush_counts["run_end"] == 1  # the remaining 2
    assert d.readiness["single:0"].flushes == 3
