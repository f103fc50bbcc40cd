"""Online distillation end to end on a fake learned backend: learning, readiness, preview, query-only
subsampling with full K/V, the optimizer contract, inference mode, metrics and layer selection."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attnplug.core import AttentionCall, LayerSpec
from attnplug.core.config import ConfigError
from attnplug.plugins.ttr.distill import DistillSettings
from attnplug.plugins.ttr.distill_train import LayerTrainer, kendall_loss

_spec = importlib.util.spec_from_file_location(
    "distill_fakes_t", Path(__file__).with_name("test_distill_fakes.py")
)
fk = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fk)  # type: ignore[union-attr]

FAST = {
    "lr": 1e-2,
    "lr_logvar": 1e-2,
    "query_cap": 32,
    "readiness_threshold": 0.1,
    "readiness_min_updates": 24,
    "ema_decay": 0.5,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest)


class Capture:
    name = "capture"

    def __init__(self):
        self.events = []

    def log_metrics(self, metrics, step, scope):
        self.events.append((scope, step, dict(metrics)))

    def run_event(self, event, info):
        pass

    def close(self):
        pass


def test_loss_goes_down_layer_becomes_ready_and_preview_serves_it():
    s = fk.make_session({**FAST, "log_every": 10, "layer_log_every": 5}, mode="preview")
    cap = Capture()
    s.loggers.loggers.append(cap)
    gen = torch.Generator().manual_seed(0)
    d, student = s.distiller, s.backends.get("fake")
    fk.run_sampling(s, runs=1, steps=8, layers=["single:0"], gen=gen)
    first_ema = d.readiness["single:0"].ema_cos
    assert first_ema > 0.2, f"the untrained student should be far from the teacher, got {first_ema}"
    assert not student.is_ready("single:0")
    for _ in range(8):
        fk.run_sampling(s, runs=1, steps=8, layers=["single:0"], gen=gen)
    r = d.readiness["single:0"]
    assert r.ema_cos < 0.1 * first_ema and r.updates == 72
    assert r.ready and student.ready["single:0"], "readiness is mirrored into the backend the router reads"

    # preview: the ready layer now serves the student, while training goes on
    q, k, v = fk.make_qkv(gen)
    call = AttentionCall("single:0", "single", 0, sigma=0.5, step_index=0, n_image_tokens=96, host="test")
    s.run_start()
    served = s.stats["single:0"].served["fake"]
    out = s.attention(q, k, v, call)
    with torch.no_grad():
        expected = student(q, k, v, call)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-4)
    assert s.stats["single:0"].served["fake"] == served + 1
    assert r.updates == 73, "preview keeps training"

    # metrics: per-layer records and cross-layer snapshots with quantiles and the ready count
    layer_recs = [m for scope, _, m in cap.events if scope == "distill/layer"]
    snaps = [m for scope, _, m in cap.events if scope == "distill"]
    assert layer_recs and snaps
    rec = layer_recs[-1]
    for key in (
        "loss",
        "nmse",
        "cos_mean",
        "cos_p5",
        "rel_l2_p95",
        "rel_l2_p99",
        "attn_kl",
        "attn_topk",
        "attn_entropy",
        "alpha_mean",
        "ready",
        "ema_cos",
        "logvar_huber",
        "logvar_cos",
    ):
        assert key in rec, key
    assert 0.0 <= rec["attn_topk"] <= 1.0 and rec["attn_kl"] >= 0.0
    first_loss = layer_recs[0]["loss"]
    assert rec["loss"] < first_loss
    last = snaps[-1]
    for q_name in ("min", "p25", "p50", "p75", "max"):
        assert f"cos_dist/{q_name}" in last
    assert any(m["ready_layers"] == 1 for m in snaps)
    assert [m["reason"] for m in snaps].count("run_end") == 9


def test_passthrough_returns_teacher_even_when_ready():
    s = fk.make_session(
        {**FAST, "readiness_min_updates": 0, "readiness_threshold": 1.0, "log_every": 0, "layer_log_every": 0}
    )
    gen = torch.Generator().manual_seed(1)
    fk.run_sampling(s, runs=1, steps=2, layers=["single:0"], gen=gen)
    assert s.backends.get("fake").is_ready("single:0")
    q, k, v = fk.make_qkv(gen)
    s.run_start()
    out = s.attention(q, k, v, AttentionCall("single:0", "single", 0, sigma=0.5, step_index=0, host="test"))
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_queries_subsampled_kv_full_and_teacher_rows_match():
    s = fk.make_session({"query_cap": 16, "replay_dtype": "float32", "log_every": 0, "layer_log_every": 0})
    gen = torch.Generator().manual_seed(2)
    q, k, v = fk.make_qkv(gen, n=80)
    s.run_start()
    call = AttentionCall(
        "single:0", "single", 0, sigma=0.5, step_index=0, n_cond_tokens=8, n_image_tokens=72, host="test"
    )
    s.attention(q, k, v, call)
    student = s.backends.get("fake")
    ((_layer, q_shape, k_shape, v_shape),) = student.train_calls
    assert q_shape == (1, 2, 16, 16) and k_shape == (1, 2, 80, 16) and v_shape == (1, 2, 80, 16)
    (sample,) = s.distiller.replay.layer("single:0")
    assert torch.equal(sample.k, k) and torch.equal(sample.v, v), "K/V stored in full"
    rows = [int((q[0, 0] - row).abs().sum(-1).argmin()) for row in sample.q[0, 0]]
    assert len(set(rows)) == 16 and rows == sorted(rows)
    assert rows != list(range(0, 80, 5)), "a random subset, not an evenly spaced one"
    assert torch.equal(sample.q, q[:, :, rows])
    teacher = F.scaled_dot_product_attention(q, k, v)[:, :, rows]
    assert torch.allclose(sample.teacher, teacher, atol=1e-6)
    # a second call draws another subset; the same seed draws the same subsets
    s.attention(q, k, v, call.with_(step_index=1))
    s2 = fk.make_session({"query_cap": 16, "replay_dtype": "float32", "log_every": 0, "layer_log_every": 0})
    s2.run_start()
    s2.attention(q, k, v, call)
    s2.attention(q, k, v, call.with_(step_index=1))
    a = [x.q for x in s.distiller.replay.layer("single:0")]
    b = [x.q for x in s2.distiller.replay.layer("single:0")]
    assert not torch.equal(a[0], a[1]) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_key_padding_mask_is_kept_and_full_masks_are_skipped():
    s = fk.make_session({"query_cap": 16, "log_every": 0, "layer_log_every": 0})
    gen = torch.Generator().manual_seed(3)
    q, k, v = fk.make_qkv(gen, n=32)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[:, -4:] = False
    s.run_start()
    call = AttentionCall("single:0", "single", 0, sigma=0.5, step_index=0, host="test")
    s.attention(q, k, v, call, mask)
    (sample,) = s.distiller.replay.layer("single:0")
    assert torch.equal(sample.mask, mask)
    full = torch.rand(1, 1, 32, 32) > 0.2
    s.attention(q, k, v, call.with_(step_index=1), full)
    assert s.distiller.skipped["full_mask"] == 1 and len(s.distiller.replay.layer("single:0")) == 1


def test_kendall_loss_and_optimizer_groups():
    st = torch.randn(1, 2, 8, 16)
    te = torch.randn(1, 2, 8, 16)
    lv = torch.tensor([0.0, -1.0])
    total, huber, cos = kendall_loss(st, te, lv, beta=0.05)
    per_token = 1 - F.cosine_similarity(st, te, dim=-1)
    assert cos == pytest.approx(float(per_token.mean()), abs=1e-6)
    expect = huber / 2 + 0 + cos / (2 * torch.exp(torch.tensor(-1.0))) - 0.5
    assert total == pytest.approx(float(expect), abs=1e-6)

    s = fk.make_session({**FAST, "grad_clip": 1e-3, "log_every": 0, "layer_log_every": 0})
    gen = torch.Generator().manual_seed(4)
    fk.run_sampling(s, runs=1, steps=2, layers=["single:0"], gen=gen)
    trainer: LayerTrainer = s.distiller.trainers["single:0"]
    groups = {g["name"]: g for g in trainer.opt.param_groups}
    assert groups["phi"]["lr"] == pytest.approx(1e-2) and groups["phi"]["weight_decay"] == pytest.approx(0.01)
    assert groups["alpha"]["lr"] == pytest.approx(5e-2) and groups["alpha"]["weight_decay"] == 0.0
    assert trainer.logvar_opt.param_groups[0]["weight_decay"] == 0.0
    assert trainer.logvar_opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainer.params))
    assert float(norm) <= 1e-3 * 1.001, "gradients are clipped to grad_clip"
    assert trainer.logvars.grad is not None and float(trainer.logvars.grad.abs().max()) > 1e-3, (
        "log-variances are not clipped"
    )
    assert trainer.logvars.detach().tolist() != [0.0, -1.0]


def _no_inference_tensors(session):
    d = session.distiller
    student = session.backends.get("fake")
    for m in student.layers.values():
        for t in [*m.parameters(), *m.buffers()]:
            assert not t.is_inference()
    for tr in d.trainers.values():
        assert not tr.logvars.is_inference()
        for opt in (tr.opt, tr.logvar_opt):
            for st in opt.state.values():
                for t in st.values():
                    assert not (torch.is_tensor(t) and t.is_inference())
    for queue in d.replay.queues.values():
        for smp in queue:
            for t in (smp.q, smp.k, smp.v, smp.teacher):
                assert not t.is_inference()


def test_whole_flow_inside_inference_mode(tmp_path):
    with torch.inference_mode():
        s = fk.make_session(
            {**FAST, "min_swap_layers": 2, "log_every": 5, "layer_log_every": 5},
            checkpoint=str(tmp_path / "c.safetensors"),
        )
        gen = torch.Generator().manual_seed(5)
        outs = fk.run_sampling(s, runs=3, steps=8, layers=["single:0", "single:1"], gen=gen)
        assert all(o.is_inference() for o in outs)
        d = s.distiller
        assert d.total_updates == 48 and d.flush_counts["run_end"] == 3
        _no_inference_tensors(s)
        s.save()
        assert not any(st.fallbacks for st in s.stats.values()), "no distiller errors"
        s2 = fk.make_session({**FAST, "min_swap_layers": 2}, checkpoint=str(tmp_path / "c.safetensors"))
        assert s2.distiller._pending_opt
        fk.run_sampling(s2, runs=1, steps=4, layers=["single:0", "single:1"], gen=gen)
        assert s2.distiller.total_updates == 56
        assert not any(st.fallbacks for st in s2.stats.values()), "no distiller errors"
        _no_inference_tensors(s2)


def test_inference_built_module_is_repaired():
    s = fk.make_session({**FAST, "log_every": 0, "layer_log_every": 0})
    student = s.backends.get("fake")
    with torch.inference_mode():
        student.layers["single:0"] = fk.FakeLayer(16)  # built under the host's inference mode
        student.specs["single:0"] = LayerSpec("single:0", 2, 16)
        assert student.layers["single:0"].phi_q.weight.is_inference()
        fk.run_sampling(s, runs=1, steps=3, layers=["single:0"], gen=torch.Generator().manual_seed(6))
    assert s.distiller.readiness["single:0"].updates == 3
    assert not s.stats["single:0"].fallbacks
    _no_inference_tensors(s)


def test_layer_selection_per_step_is_seeded_and_bounded():
    layers = [f"single:{i}" for i in range(6)] + ["double:0"]
    cfg = {
        "min_swap_layers": 2,
        "max_swap_layers": 3,
        "layers": ["single:*"],
        "exclude": ["single:5"],
        "query_cap": 8,
        "log_every": 0,
        "layer_log_every": 0,
    }

    def trained_sets(seed):
        s = fk.make_session(cfg, seed=seed)
        sets = []
        s.run_start()
        gen = torch.Generator().manual_seed(0)
        for step in range(12):
            before = {k: st.trained for k, st in s.stats.items()}
            for key in layers:
                q, k, v = fk.make_qkv(gen, n=16)
                s.attention(q, k, v, AttentionCall(key, sigma=1 - step / 12, step_index=step, host="test"))
            sets.append(sorted(k for k, st in s.stats.items() if st.trained > before.get(k, 0)))
        return sets

    a, b, c = trained_sets(1), trained_sets(1), trained_sets(2)
    assert a == b and a != c
    assert a[0] == ["single:0", "single:1", "single:2"], "first step: the first layers seen, up to the max"
    for st in a[1:]:
        assert 2 <= len(st) <= 3 and set(st) <= {f"single:{i}" for i in range(5)}
    assert len({tuple(x) for x in a[1:]}) > 3, "the set changes from step to step"


def test_settings_validation_names_the_field():
    with pytest.raises(ConfigError, match="min_swap_layers"):
        fk.make_session({"min_swap_layers": 4, "max_swap_layers": 2})
    with pytest.raises(ConfigError, match="student: unknown backend 'nope'"):  # at validation, before any work
        fk.make_session({"student": "nope"})
    assert DistillSettings().replay_dtype == "float16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_flow_inference_mode_resume_oom_and_preview(tmp_path):
    path = tmp_path / "cuda.safetensors"
    layers = ["single:0", "single:1"]
    with torch.inference_mode():
        s = fk.make_session(
            {**FAST, "min_swap_layers": 2, "log_every": 5, "layer_log_every": 5}, mode="preview"
        )
        gen = torch.Generator().manual_seed(0)
        fk.run_sampling(s, runs=6, steps=8, layers=layers, gen=gen, device="cuda")
        d, student = s.distiller, s.backends.get("fake")
        assert not any(st.fallbacks for st in s.stats.values()), [st.fallbacks for st in s.stats.values()]
        assert d.total_updates == 96 and all(student.ready.get(k) for k in layers)
        assert next(student.layers["single:0"].parameters()).device.type == "cuda"
        for q in d.replay.queues.values():
            assert all(x.k.device.type == "cpu" and x.k.dtype == torch.float16 for x in q)
        tr = d.trainers["single:0"]
        assert all(
            t.device.type == "cuda" for st in tr.opt.state.values() for n, t in st.items() if n != "step"
        )
        _no_inference_tensors(s)
        served = s.stats["single:0"].served["fake"]
        assert served > 0, "preview served the ready layer on the GPU"
        s.save(path)

        s2 = fk.make_session({**FAST, "min_swap_layers": 2}, mode="preview")
        s2.load(path)
        s2.backends.get("fake").oom_budget["single:1"] = 1
        fk.run_sampling(s2, runs=1, steps=4, layers=layers, gen=gen, device="cuda")
        d2 = s2.distiller
        assert d2.readiness["single:0"].updates == 48 + 4
        assert d2.oom_events["single:1"] == 1 and s2.backends.get("fake").chunk["single:1"] == 32
        assert d2.query_caps["single:1"] == 32, "the cap is already at oom_min_query_cap"
        assert not any(st.fallbacks for st in s2.stats.values())
        _no_inference_tensors(s2)
