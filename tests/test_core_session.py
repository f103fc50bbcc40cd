"""Session behaviour: exact backends vs a float64 reference, fallbacks, strict mode, runs, loggers."""
from __future__ import annotations

import logging

import pytest
import torch

from attnplug.core import ApproximationError, Session
from attnplug.core.backend import Backend, Capabilities
from attnplug.core.exact import sdpa


def _reference(q, k, v, keep=None):
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_matches_float64_reference(dtype, tol, masked):
    q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
    keep = None
    if masked:
        keep = torch.ones(2, 37, dtype=torch.bool)
        keep[0, 30:] = False
        keep[1, 5:9] = False
    out = sdpa(q.to(dtype), k.to(dtype), v.to(dtype), keep)
    ref = _reference(q.to(dtype), k.to(dtype), v.to(dtype), keep)
    rel = (out.double() - ref).norm() / ref.norm()
    assert out.dtype == dtype and rel < tol


def test_additive_mask_equals_bool_mask():
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    keep = torch.ones(1, 10, dtype=torch.bool)
    keep[0, 7:] = False
    additive = torch.zeros(1, 1, 1, 10).masked_fill(~keep[:, None, None, :], float("-inf"))
    torch.testing.assert_close(sdpa(q, k, v, keep), sdpa(q, k, v, additive))


def test_served_key_padding_drops_an_all_valid_mask_and_broadcasts_one_row():
    from attnplug.core.masks import key_padding, served_key_padding

    assert served_key_padding(None, 3) is None
    assert served_key_padding(torch.ones(1, 10, dtype=torch.bool), 3) is None  # masks nothing
    keep = torch.ones(1, 10, dtype=torch.bool)
    keep[0, 7:] = False
    got = served_key_padding(key_padding(keep[:, None, None, :], 4, 10), 3)
    assert got.shape == (3, 10) and torch.equal(got, keep.expand(3, -1))
    per_batch = torch.stack([keep[0], torch.ones(10, dtype=torch.bool)])
    assert torch.equal(served_key_padding(per_batch, 2), per_batch)


class Broken(Backend):
    """An approximate backend whose behaviour each test picks."""

    name = "broken"
    capabilities = Capabilities(exact=False, mask_kinds=("none",))

    def __init__(self, mode):
        self.mode = mode

    def forward(self, q, k, v, call, mask=None):
        if self.mode == "nan":
            return torch.full_like(q, float("nan"))
        if self.mode == "raise":
            raise RuntimeError("kernel exploded")
        return torch.zeros_like(q) + 7.0


def _session(core_plugins, mode, strict=False, finite_check="every_call"):
    s = Session({"backend": "sdpa", "exact": "sdpa", "strict": strict, "loggers": [], "finite_check": finite_check},
                core_plugins)
    s.backends.add(Broken(mode), "test")
    s.router.primary = "broken"
    return s


@pytest.mark.parametrize("mode, reason", [("nan", "non-finite output"), ("raise", "error")])
def test_failing_approximation_falls_back_to_exact_and_says_so(core_plugins, make_call, caplog, mode, reason):
    s = _session(core_plugins, mode)
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        for step in range(3):
            out = s.attention(q, k, v, make_call("single:0", step_index=step))
            torch.testing.assert_close(out, sdpa(q, k, v))
    stats = s.stats["single:0"]
    assert stats.fallbacks[reason] == 3 and stats.served["sdpa"] == 3
    warnings = [r for r in caplog.records if "fell back to exact" in r.getMessage()]
    assert len(warnings) == 1 and "single:0" in warnings[0].getMessage()  # once per layer


def test_per_step_finite_check_keeps_nan_out_and_serves_exact_for_the_rest_of_the_session(core_plugins, make_call,
                                                                                         caplog):
    """finite_check = "per_step" (the default): no sync per call; the non-finite rows never leave the device (the
    default guard replaces them by zeros), the layer's flag is read at the next step, and from then on the layer gets
    exact attention — in this run and the next ones — counted and warned once."""
    s = _session(core_plugins, "nan", finite_check="per_step")
    assert Session({"loggers": []}, core_plugins).config.root.finite_check == "per_step"  # the default
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        first = s.attention(q, k, v, make_call("single:0", step_index=0))
        assert torch.equal(first, torch.zeros_like(first))  # replaced on the device, not NaN
        for step in (1, 2):
            torch.testing.assert_close(s.attention(q, k, v, make_call("single:0", step_index=step)), sdpa(q, k, v))
        s.run_end()
        torch.testing.assert_close(s.attention(q, k, v, make_call("single:0", step_index=0)), sdpa(q, k, v))
    stats = s.stats["single:0"]
    assert stats.fallbacks["non-finite output (replaced on the device)"] == 1
    assert stats.served["broken"] == 1 and stats.served["sdpa"] == 3
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and "single:0" in warnings[0] and "rest of the session" in warnings[0]


def test_per_step_finite_check_without_steps_still_checks(core_plugins, make_call):
    """A host that reports neither steps nor sigmas: the flags are polled every POLL_CALLS approximate calls."""
    from attnplug.core.session import POLL_CALLS

    s = _session(core_plugins, "nan", finite_check="per_step")
    q = torch.randn(1, 2, 6, 8)
    call = make_call("single:0", step_index=None, sigma=None)
    outs = [s.attention(q, q, q, call) for _ in range(POLL_CALLS + 3)]
    assert all(bool(torch.isfinite(o).all()) for o in outs)
    assert s.stats["single:0"].served["broken"] == POLL_CALLS
    assert s.stats["single:0"].fallbacks["non-finite output (replaced on the device)"] == 1


def test_guard_rows_replaces_only_rows_that_are_not_finite():
    from attnplug.core.finite import guard_rows

    out = torch.arange(24.0).reshape(1, 2, 3, 4)
    out[0, 1, 2, 3] = float("inf")
    out[0, 0, 1, 0] = float("nan")
    flag = torch.zeros(1, dtype=torch.int32)
    fallback = torch.full_like(out, -1.0)
    fallback[0, 0, 1, 2] = float("nan")
    got = guard_rows(out.clone(), flag, fallback)
    assert int(flag) == 1 and bool(torch.isfinite(got).all())
    assert torch.equal(got[0, 1, 2], torch.full((4,), -1.0)) and torch.equal(got[0, 0, 1], torch.tensor([-1, -1, 0, -1.]))
    keep = torch.ones(1, 2, 3, dtype=torch.bool)
    keep[0, 1, 2] = keep[0, 0, 1] = False
    assert torch.equal(got[keep], out[keep])  # every other row untouched
    clean = torch.ones(1, 1, 2, 4)
    assert torch.equal(guard_rows(clean, flag), clean) and int(flag) == 1  # nothing new: the flag stays as it was


def test_per_step_finite_check_keeps_finite_outputs_and_raises_in_strict_mode(core_plugins, make_call):
    s = _session(core_plugins, "ok", finite_check="per_step")
    q = torch.randn(1, 2, 6, 8)
    for step in range(3):
        assert float(s.attention(q, q, q, make_call(step_index=step)).mean()) == 7.0
    assert not s.stats["single:0"].fallbacks
    strict = _session(core_plugins, "nan", strict=True, finite_check="per_step")
    strict.attention(q, q, q, make_call(step_index=0))
    with pytest.raises(ApproximationError, match="single:0"):
        strict.attention(q, q, q, make_call(step_index=1))


def test_unsupported_mask_falls_back(core_plugins, make_call):
    s = _session(core_plugins, "ok")
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    keep = torch.ones(1, 6, dtype=torch.bool)
    out = s.attention(q, k, v, make_call(), mask=keep)
    torch.testing.assert_close(out, sdpa(q, k, v, keep))
    assert s.stats["single:0"].fallbacks["unsupported"] == 1
    assert float(s.attention(q, k, v, make_call()).mean()) == 7.0  # without mask the backend serves


@pytest.mark.parametrize("mode", ["nan", "raise"])
def test_strict_mode_raises(core_plugins, make_call, mode):
    s = _session(core_plugins, mode, strict=True)
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ApproximationError, match="single:0"):
        s.attention(q, q, q, make_call())


def test_host_backend_uses_host_function(core_plugins, make_call):
    s = Session({"backend": "host", "exact": "host", "loggers": []}, core_plugins)
    q = torch.randn(1, 2, 6, 8)
    seen = []

    def host(q_, k_, v_, mask):
        seen.append(q_.shape)
        return v_ * 2

    torch.testing.assert_close(s.attention(q, q, q, make_call(), host_attention=host), q * 2)
    assert seen == [q.shape] and s.stats["single:0"].served["host"] == 1
    # without a host function the exact path is SDPA (warned once)
    torch.testing.assert_close(s.attention(q, q, q, make_call(step_index=1)), sdpa(q, q, q))


def test_runs_detected_from_step_index(core_plugins, make_call):
    s = Session({"loggers": []}, core_plugins)
    q = torch.randn(1, 1, 4, 8)
    for run in range(3):
        for step in range(4):
            for layer in ("double:0", "single:0"):
                s.attention(q, q, q, make_call(layer, step_index=step))
    s.run_end()
    assert s.runs_done == 3


class Recorder:
    name = "recorder"

    def __init__(self):
        self.events = []

    def log_metrics(self, metrics, step, scope):
        self.events.append((scope, step, dict(metrics)))

    def run_event(self, event, info):
        self.events.append((event, info["index"]))

    def close(self):
        self.events.append("closed")


class Exploding:
    name = "exploding"

    def log_metrics(self, metrics, step, scope):
        raise OSError("disk full")

    def run_event(self, event, info):
        raise OSError("disk full")

    def close(self):
        pass


def test_failing_logger_is_disabled_and_sampling_goes_on(core_plugins, make_call, caplog):
    s = Session({"loggers": []}, core_plugins)
    good = Recorder()
    s.loggers.loggers[:] = [Exploding(), good]
    q = torch.randn(1, 1, 4, 8)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        s.run_start(num_steps=2)
        s.attention(q, q, q, make_call(step_index=0))
        s.run_end()
        s.close()
    assert "exploding" in s.loggers.disabled and "disk full" in s.loggers.disabled["exploding"]
    assert ("run_start", 0) in good.events and ("run_end", 0) in good.events and good.events[-1] == "closed"
    assert sum("logger 'exploding' disabled" in r.getMessage() for r in caplog.records) == 1


def test_jsonl_logger_writes_lines(core_plugins, make_call, tmp_path):
    import json

    path = tmp_path / "logs" / "run.jsonl"
    s = Session({"loggers": [{"kind": "jsonl", "path": str(path)}]}, core_plugins)
    q = torch.randn(1, 1, 4, 8)
    s.attention(q, q, q, make_call(step_index=0))
    s.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line.get("event") for line in lines if "event" in line] == ["run_start", "run_end"]
    assert any(line.get("scope") == "session" and line["metrics"]["calls"] == 1 for line in lines)


def test_inputs_must_be_4d(core_plugins, make_call):
    s = Session({"loggers": []}, core_plugins)
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        s.attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4), make_call())


def test_training_passthrough_returns_exact_even_for_ready_layers(core_plugins, make_call):
    from attnplug.core import hookimpl
    from attnplug.core.backend import LearnedBackend

    class Always(LearnedBackend):
        name = "always"

        def forward(self, q, k, v, call, mask=None):
            return torch.zeros_like(q)

    class Idle:
        name = "idle"

        def wants(self, call):
            return False

        def observe(self, *a):
            raise AssertionError("not called")

        def step_start(self, *a):
            pass

        def run_start(self, run):
            pass

        def run_end(self, run):
            pass

    class P:
        @hookimpl
        def attnplug_register_backends(self, registrar):
            registrar.add("always", lambda s, session: Always())

        @hookimpl
        def attnplug_register_distillers(self, registrar):
            registrar.add("idle", lambda s, session: Idle())

    core_plugins.register(P(), name="p")
    q = torch.randn(1, 2, 6, 8)
    for mode, expect_exact in (("passthrough", True), ("preview", False)):
        s = Session({"backend": "always", "exact": "sdpa", "training": True, "distiller": "idle", "mode": mode,
                     "loggers": []}, core_plugins)
        s.backends.get("always").ready["single:0"] = True
        out = s.attention(q, q, q, make_call())
        assert torch.equal(out, sdpa(q, q, q)) is expect_exact, mode


def test_shadow_exact_records_per_layer_fidelity(core_plugins, make_call):
    class Noisy(Backend):
        name = "noisy"
        capabilities = Capabilities(exact=False)

        def forward(self, q, k, v, call, mask=None):
            return sdpa(q, k, v) + 0.1 * torch.randn_like(q)

    s = Session({"backend": "sdpa", "exact": "sdpa", "shadow_exact": True, "loggers": []}, core_plugins)
    s.backends.add(Noisy(), "test")
    s.router.primary = "noisy"
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    for step in range(3):
        s.attention(q, k, v, make_call("single:0", step_index=step))
    fid = s.summary()["layers"]["single:0"]["fidelity"]
    assert fid["calls"] == 3 and 0.5 < fid["cosine"] < 0.999 and 0.01 < fid["rel_l2"] < 1.0
    assert s.stats["single:0"].served == {"noisy": 3}  # the shadow exact call is not counted as served
