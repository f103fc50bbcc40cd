"""The distiller's learning-rate schedule and the offline fit on collected replay (fake backend)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from attnplug.plugins.ttr.distill_train import LayerTrainer, OptimConfig

_spec = importlib.util.spec_from_file_location(
    "distill_fakes_s", Path(__file__).with_name("test_distill_fakes.py")
)
fk = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fk)  # type: ignore[union-attr]

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"lr": 1e-2, "min_swap_layers": 2, "query_cap": 32, "log_every": 0, "layer_log_every": 0}


def test_cosine_factor_decays_to_the_floor_and_stays():
    cfg = OptimConfig(1e-3, 5.0, 0.0, 1e-3, 1.0, 0.05, (0.0, -1.0), "cosine", 100, 0.1)
    assert cfg.lr_factor(0) == pytest.approx(1.0)
    assert cfg.lr_factor(50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cfg.lr_factor(100) == pytest.approx(0.1)
    assert cfg.lr_factor(10_000) == pytest.approx(0.1), "after the decay the lr stays at the floor"
    factors = [cfg.lr_factor(t) for t in range(0, 101, 10)]
    assert all(a > b for a, b in zip(factors, factors[1:])), "monotone decay"
    const = OptimConfig(1e-3, 5.0, 0.0, 1e-3, 1.0, 0.05, (0.0, -1.0))
    assert const.lr_factor(10_000) == 1.0


def test_trainer_follows_the_schedule_per_layer_and_resumes_its_position():
    s = fk.make_session({**QUIET, "lr_schedule": "cosine", "lr_decay_updates": 8, "lr_min_ratio": 0.0})
    gen = torch.Generator().manual_seed(0)
    fk.run_sampling(s, runs=1, steps=4, layers=["single:0", "single:1"], gen=gen)
    fk.run_sampling(s, runs=1, steps=2, layers=["single:1"], gen=gen)
    t0: LayerTrainer = s.distiller.trainers["single:0"]
    t1: LayerTrainer = s.distiller.trainers["single:1"]
    assert (t0.updates, t1.updates) == (4, 6)
    # the lr used by update t is base * factor(t); the last update of single:1 was t = 5
    phi1 = {g["name"]: g for g in t1.opt.param_groups}
    assert phi1["phi"]["lr"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 5 / 8)))
    assert phi1["alpha"]["lr"] == pytest.approx(5e-2 * 0.5 * (1 + math.cos(math.pi * 5 / 8)))
    flat = t1.flat_state()
    fresh = LayerTrainer("single:1", s.backends.get("fake"), s.distiller.optim, torch.device("cpu"))
    fresh.load_flat_state(flat)
    assert fresh.updates == 6, "a resumed layer continues its schedule, not restarts it"
    old = {k: v for k, v in flat.items() if k != "updates"}  # checkpoints carry only optimizer states
    fresh.load_flat_state(old)
    assert fresh.updates == 6, "the position is AdamW's own step count"


def test_collect_only_then_offline_fit_trains_from_replay_and_sets_readiness():
    s = fk.make_session({**QUIET, "train_steps_per_call": 0, "replay_per_layer": 64,
                         "readiness_threshold": 0.1, "readiness_min_updates": 24, "ema_decay": 0.5,
                         "lr_schedule": "cosine", "lr_decay_updates": 300, "lr_min_ratio": 0.0})
    gen = torch.Generator().manual_seed(1)
    fk.run_sampling(s, runs=2, steps=8, layers=["single:0", "single:1"], gen=gen)
    d = s.distiller
    assert d.total_updates == 0, "train_steps_per_call = 0 only collects"
    assert len(d.replay.layer("single:0")) == 16 and len(d.replay.layer("single:1")) == 16
    assert not any(r.ready for r in d.readiness.values())
    made = d.fit_replay(300)
    assert made == 600 and d.total_updates == 600
    assert d.trainers["single:0"].updates == 300
    for key in ("single:0", "single:1"):
        r = d.readiness[key]
        assert r.flushes >= 20, "readiness is folded along the fit, not once"
        assert r.ema_cos < 0.1 and r.ready, f"{key} fitted offline should be ready: ema {r.ema_cos}"
        assert s.backends.get("fake").ready[key]
