"""Distiller state: resume equivalence through a checkpoint, and out-of-memory handling."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attnplug.core import AttentionCall
from attnplug.core.checkpoint import load_checkpoint

_spec = importlib.util.spec_from_file_location(
    "distill_fakes_s", Path(__file__).with_name("test_distill_fakes.py")
)
fk = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fk)  # type: ignore[union-attr]

LAYERS = ["single:0", "single:1", "single:2"]
CFG = {
    "lr": 1e-2,
    "lr_logvar": 1e-2,
    "query_cap": 24,
    "readiness_min_updates": 4,
    "readiness_threshold": 0.3,
    "ema_decay": 0.5,
    "replay_per_layer": 3,
    "train_steps_per_call": 2,
    "log_every": 7,
    "layer_log_every": 5,
}
STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest)


def drive(session, gen, steps, start=True, end=True):
    if start:
        session.run_start(num_steps=STEPS)
    outs = []
    for step in steps:
        for key in LAYERS:
            q, k, v = fk.make_qkv(gen, n=48)
            call = AttentionCall(
                key,
                "single",
                int(key[-1]),
                sigma=1 - step / STEPS,
                step_index=step,
                num_steps=STEPS,
                n_cond_tokens=8,
                n_image_tokens=40,
                host="test",
            )
            outs.append(session.attention(q, k, v, call))
    if end:
        session.run_end()
    return outs


def snapshot(session):
    d = session.distiller
    student = session.backends.get("fake")
    out = {
        f"w/{k}/{n}": p.detach().clone() for k, m in student.layers.items() for n, p in m.named_parameters()
    }
    for key, tr in d.trainers.items():
        out.update({f"opt/{key}/{n}": t for n, t in tr.flat_state().items()})
    ready = {k: (r.updates, r.ema_cos, r.ema_loss, r.ready, r.run_count) for k, r in d.readiness.items()}
    return out, ready, d.total_updates, dict(d.flush_counts), d.replay.counters.to_json(), d.rng.get_state()


def assert_same(a, b):
    ta, ra, ua, fa, ca, ga = a
    tb, rb, ub, fb, cb, gb = b
    assert ua == ub and fa == fb and ca == cb
    assert torch.equal(ga, gb), "RNG state continues"
    assert set(ra) == set(rb)
    for k in ra:
        assert ra[k][0] == rb[k][0] and ra[k][3] == rb[k][3] and ra[k][4] == rb[k][4]
        assert ra[k][1] == pytest.approx(rb[k][1], abs=1e-6) and ra[k][2] == pytest.approx(rb[k][2], abs=1e-6)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.allclose(ta[k].float(), tb[k].float(), atol=1e-6, rtol=1e-5), k


@pytest.mark.parametrize("mid_run", [False, True])
def test_resume_equivalence(tmp_path, mid_run):
    path = tmp_path / "ckpt.safetensors"
    cfg = {**CFG, "save_replay": True}

    straight = fk.make_session(cfg)
    gen = torch.Generator().manual_seed(11)
    for _ in range(4):
        drive(straight, gen, range(STEPS))
    expected = snapshot(straight)
    assert expected[2] > 0 and any(r[3] for r in expected[1].values()), "some layer became ready on the way"

    first = fk.make_session(cfg)
    gen = torch.Generator().manual_seed(11)
    for _ in range(1 if mid_run else 2):
        drive(first, gen, range(STEPS))
    if mid_run:  # save between two steps of a run
        drive(first, gen, range(STEPS // 2), end=False)
    first.save(path)
    k_updates = first.distiller.total_updates
    assert k_updates > 0

    resumed = fk.make_session(cfg)
    resumed.load(path)
    if mid_run:
        drive(resumed, gen, range(STEPS // 2, STEPS), start=False)  # the session starts the run by itself
        for _ in range(2):
            drive(resumed, gen, range(STEPS))
    else:
        for _ in range(2):
            drive(resumed, gen, range(STEPS))
    got = snapshot(resumed)
    assert got[2] == expected[2]
    assert_same(got, expected)


def test_state_without_replay_keeps_counters_and_readiness(tmp_path):
    path = tmp_path / "c.safetensors"
    s = fk.make_session(CFG)
    drive(s, torch.Generator().manual_seed(0), range(STEPS))
    s.save(path)
    comps = load_checkpoint(path)
    tensors, meta = comps["distiller.fake_distill"]
    assert meta["format"] == "attnplug.distill" and "rng" in tensors
    assert not any(n.startswith("replay/") for n in tensors), "replay is not saved by default"
    assert any(n.endswith("exp_avg_sq") for n in tensors) and any(n.endswith("logvars") for n in tensors)
    s2 = fk.make_session(CFG)
    s2.load(path)
    d, d2 = s.distiller, s2.distiller
    assert len(d2.replay) == 0 and d2.replay.counters.to_json() == d.replay.counters.to_json()
    assert {k: r.to_json() for k, r in d2.readiness.items()} == {
        k: r.to_json() for k, r in d.readiness.items()
    }
    assert s2.backends.get("fake").ready == s.backends.get("fake").ready
    assert d2.selector.known == d.selector.known


def test_config_wins_over_checkpoint_and_says_so(tmp_path, caplog):
    path = tmp_path / "c.safetensors"
    s = fk.make_session(CFG)
    drive(s, torch.Generator().manual_seed(0), range(STEPS))
    s.save(path)
    s2 = fk.make_session({**CFG, "readiness_threshold": 0.05})
    with caplog.at_level("INFO", logger="attnplug"):
        s2.load(path)
    assert "readiness_threshold" not in caplog.text  # field names of the rule are its own
    assert "threshold: file 0.3 -> config 0.05" in caplog.text
    assert s2.distiller.rule.threshold == 0.05


def test_out_of_memory_shrinks_then_stops_training_the_layer(tmp_path):
    cfg = {
        **CFG,
        "train_steps_per_call": 1,
        "query_cap": 32,
        "oom_min_query_cap": 8,
        "min_swap_layers": 3,
        "log_every": 0,
        "layer_log_every": 0,
    }
    s = fk.make_session(cfg)
    student = s.backends.get("fake")
    d = s.distiller
    gen = torch.Generator().manual_seed(5)
    drive(s, gen, range(2))
    assert len(d.replay.layer("single:0")) == 2

    student.oom_budget["single:0"] = 1
    s.run_start()
    q, k, v = fk.make_qkv(gen, n=48)
    call = AttentionCall("single:0", "single", 0, sigma=0.9, step_index=0, host="test")
    out = s.attention(q, k, v, call)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v)), "sampling goes on with the teacher"
    assert d.query_caps["single:0"] == 16 and student.chunk["single:0"] == 32
    assert d.replay.layer("single:0") == [], "the layer's replay is cleared"
    assert not s.stats["single:0"].fallbacks
    s.run_end()

    student.train_calls.clear()
    drive(s, gen, range(1))
    assert [c[1][2] for c in student.train_calls if c[0] == "single:0"] == [16], "the smaller cap is sticky"

    student.oom_budget["single:0"] = 100
    drive(s, gen, range(STEPS))
    assert (
        "single:0" in d.selector.disabled
        and d.query_caps["single:0"] == 8
        and student.chunk["single:0"] == 16
    )
    assert d.oom_events["single:0"] == 3  # 32->16 + chunk 64->32, 16->8 + chunk 32->16, then nothing left
    before = d.readiness["single:1"].updates
    calls_before = len(student.train_calls)
    drive(s, gen, range(STEPS))
    assert all(c[0] != "single:0" for c in student.train_calls[calls_before:]), "training of single:0 stopped"
    assert d.readiness["single:1"].updates > before, "other layers keep training"
    assert not any(st.fallbacks for st in s.stats.values())

    path = tmp_path / "oom.safetensors"
    s.save(path)
    s2 = fk.make_session(cfg)
    s2.load(path)
    d2 = s2.distiller
    assert (
        "single:0" in d2.selector.disabled
        and d2.query_caps["single:0"] == 8
        and d2.oom_events["single:0"] == 3
    )
    assert s2.backends.get("fake").chunk["single:0"] == 16
    s2.run_start()
    q, k, v = fk.make_qkv(gen, n=48)
    s2.attention(q, k, v, AttentionCall("single:0", "single", 0, sigma=0.9, step_index=0, host="test"))
    assert s2.backends.get("fake").train_calls == []
