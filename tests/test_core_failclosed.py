"""Fail-closed: a gate, readiness check, capability check, backend output, hook or logger that misbehaves never
aborts sampling — the call gets exact attention, the failure is counted and warned once; strict mode raises."""
from __future__ import annotations

import logging

import pytest
import torch

from attnplug.core import ALLOW, ApproximationError, Session, hookimpl
from attnplug.core.backend import Backend, Capabilities, LearnedBackend
from attnplug.core.config import ConfigError, load_config
from attnplug.core.exact import sdpa
from attnplug.core.gates import force


class Seven(Backend):
    """An approximate backend that serves every call with 7s (so a served call is easy to tell)."""

    name = "seven"
    capabilities = Capabilities(exact=False)

    def forward(self, q, k, v, call, mask=None):
        return torch.zeros_like(q) + 7.0


class Gate:
    def __init__(self, decide, name="flaky"):
        self._decide = decide
        self.name = name

    def decide(self, call):
        return self._decide(call)


def _session(core_plugins, backend=None, strict=False, gates=()):
    s = Session({"backend": "sdpa", "exact": "sdpa", "strict": strict, "loggers": []}, core_plugins)
    backend = backend or Seven()
    s.backends.add(backend, "test")
    s.router.primary = backend.name
    s.router.gates = list(gates)
    return s


def _qkv(n=6):
    return tuple(torch.randn(1, 2, n, 8) for _ in range(3))


def _boom(call):
    raise RuntimeError("gate exploded")


@pytest.mark.parametrize("decide, text", [
    (_boom, "RuntimeError: gate exploded"),
    (lambda call: "allow", "decide returned str, expected a GateDecision"),
    (lambda call: force("nosuch", "typo"), "unknown backend 'nosuch'"),
])
def test_a_failing_gate_vetoes_counts_and_warns_once(core_plugins, make_call, caplog, decide, text):
    s = _session(core_plugins, gates=[Gate(decide)])
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        for step in range(3):
            torch.testing.assert_close(s.attention(q, k, v, make_call(step_index=step)), sdpa(q, k, v))
    stats = s.stats["single:0"]
    assert stats.fallbacks["gate error"] == 3 and stats.served == {"sdpa": 3}
    warned = [r.getMessage() for r in caplog.records if "gate 'flaky' failed" in r.getMessage()]
    assert len(warned) == 1 and text in warned[0] and "single:0" in warned[0]


def test_a_failing_gate_raises_in_strict_mode(core_plugins, make_call):
    s = _session(core_plugins, strict=True, gates=[Gate(_boom)])
    q, k, v = _qkv()
    with pytest.raises(ApproximationError, match="gate 'flaky' failed on single:0: RuntimeError: gate exploded"):
        s.attention(q, k, v, make_call())


def test_a_gate_whose_name_raises_still_vetoes(core_plugins, make_call):
    class Nameless:
        @property
        def name(self):
            raise AttributeError("no name")

        def decide(self, call):
            raise RuntimeError("and no decision")

    s = _session(core_plugins, gates=[Nameless()])
    q, k, v = _qkv()
    torch.testing.assert_close(s.attention(q, k, v, make_call()), sdpa(q, k, v))
    assert s.stats["single:0"].fallbacks["gate error"] == 1


def test_an_exact_force_after_a_failing_gate_still_wins(core_plugins, make_call):
    s = _session(core_plugins, gates=[Gate(_boom), Gate(lambda call: force("sdpa", "exact here"), "sched")])
    q, k, v = _qkv()
    torch.testing.assert_close(s.attention(q, k, v, make_call()), sdpa(q, k, v))
    assert s.stats["single:0"].fallbacks["gate error"] == 1


class Learned(LearnedBackend):
    name = "learned"

    def __init__(self, ready):
        super().__init__()
        self._ready = ready

    def is_ready(self, layer_key):
        return self._ready(layer_key)

    def forward(self, q, k, v, call, mask=None):
        return torch.zeros_like(q) + 7.0


def test_a_raising_readiness_check_means_not_ready(core_plugins, make_call, caplog):
    def ready(key):
        raise ValueError("readiness table corrupt")

    s = _session(core_plugins, backend=Learned(ready))
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        for step in range(2):
            torch.testing.assert_close(s.attention(q, k, v, make_call(step_index=step)), sdpa(q, k, v))
    assert s.stats["single:0"].fallbacks["readiness error"] == 2
    assert sum("readiness check of 'learned' failed" in r.getMessage() for r in caplog.records) == 1
    strict = _session(core_plugins, backend=Learned(ready), strict=True)
    with pytest.raises(ApproximationError, match="readiness table corrupt"):
        strict.attention(q, k, v, make_call())


def test_a_raising_capability_check_is_unsupported(core_plugins, make_call, caplog):
    class Picky(Seven):
        name = "picky"
        checks = 0

        def not_supported_reasons(self, q, k, v, call, mask=None):
            Picky.checks += 1
            raise TypeError("cannot inspect this call")

    s = _session(core_plugins, backend=Picky())
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        for step in range(3):
            torch.testing.assert_close(s.attention(q, k, v, make_call(step_index=step)), sdpa(q, k, v))
    assert s.stats["single:0"].fallbacks["unsupported"] == 3
    assert Picky.checks == 1  # cached per shape, like a normal answer
    warned = [r.getMessage() for r in caplog.records if "fell back to exact" in r.getMessage()]
    assert len(warned) == 1 and "capability check raised TypeError: cannot inspect this call" in warned[0]
    with pytest.raises(ApproximationError, match="capability check raised"):
        _session(core_plugins, backend=Picky(), strict=True).attention(q, k, v, make_call())


@pytest.mark.parametrize("bad", [
    lambda q, v: torch.zeros(q.shape[0], q.shape[2], q.shape[1] * v.shape[3]),  # the host's [B, N, H*D] layout
    lambda q, v: torch.zeros(q.shape[0], q.shape[1], q.shape[2] + 1, v.shape[3]),
    lambda q, v: None,
])
def test_a_wrong_output_shape_falls_back_to_exact(core_plugins, make_call, bad):
    class Wrong(Seven):
        name = "wrong"

        def forward(self, q, k, v, call, mask=None):
            return bad(q, v)

    s = _session(core_plugins, backend=Wrong())
    q, k, v = _qkv()
    torch.testing.assert_close(s.attention(q, k, v, make_call()), sdpa(q, k, v))
    assert s.stats["single:0"].fallbacks["error"] == 1 and "wrong" not in s.stats["single:0"].served
    with pytest.raises(ApproximationError, match="expected an output of shape"):
        _session(core_plugins, backend=Wrong(), strict=True).attention(q, k, v, make_call())


def test_the_right_shape_is_served(core_plugins, make_call):
    s = _session(core_plugins)
    q, k, v = _qkv()
    assert float(s.attention(q, k, v, make_call()).mean()) == 7.0 and s.stats["single:0"].served == {"seven": 1}


def test_a_schedule_rule_naming_an_unknown_backend_fails_validation(core_plugins):
    with pytest.raises(ConfigError) as err:
        load_config({"gates": [{"kind": "schedule", "rules": [{"backend": "hots", "steps": ":2"},
                                                                {"backend": "sdpa", "steps": "-1:"}]}]}, core_plugins)
    assert err.value.problems == ["[gates[0] (kind 'schedule')] rules.0.backend: unknown backend 'hots'; "
                                  "registered backends: ['host', 'sdpa']"]


def test_a_raising_step_hook_warns_once_and_sampling_goes_on(core_plugins, make_call, caplog):
    class StepBomb:
        calls = 0

        @hookimpl
        def attnplug_step_start(self, session, step_index, sigma):
            StepBomb.calls += 1
            raise RuntimeError("step hook broke")

    core_plugins.register(StepBomb(), name="stepbomb")
    s = Session({"loggers": []}, core_plugins)
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        for step in range(5):
            s.attention(q, k, v, make_call(step_index=step))
    assert StepBomb.calls == 5 and core_plugins.hook_failures[("stepbomb", "attnplug_step_start")] == 5
    assert sum("step hook broke" in r.getMessage() for r in caplog.records) == 1


def test_a_raising_distiller_step_start_warns_once(core_plugins, make_call, caplog):
    class Distiller:
        name = "d"

        def wants(self, call):
            return False

        def step_start(self, step_index, sigma):
            raise RuntimeError("selector broke")

        def run_start(self, run):
            pass

        def run_end(self, run):
            pass

    class P:
        @hookimpl
        def attnplug_register_distillers(self, registrar):
            registrar.add("d", lambda settings, session: Distiller())

    core_plugins.register(P(), name="p")
    s = Session({"loggers": [], "training": True, "distiller": "d", "exact": "sdpa"}, core_plugins)
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        for step in range(4):
            s.attention(q, k, v, make_call(step_index=step))
    assert sum("selector broke" in r.getMessage() for r in caplog.records) == 1


class _Exits:
    name = "exits"

    def log_metrics(self, metrics, step, scope):
        raise SystemExit(3)

    def run_event(self, event, info):
        raise SystemExit(3)

    def close(self):
        pass


class _BadName:
    @property
    def name(self):
        raise RuntimeError("name broke")

    def log_metrics(self, metrics, step, scope):
        raise OSError("disk full")

    def run_event(self, event, info):
        raise OSError("disk full")

    def close(self):
        pass


class _BadText(Exception):
    def __str__(self):
        raise RuntimeError("str broke")


class _BadError:
    name = "bad-error"

    def log_metrics(self, metrics, step, scope):
        raise _BadText()

    def run_event(self, event, info):
        raise _BadText()

    def close(self):
        pass

    def __eq__(self, other):  # list.remove would call this
        raise RuntimeError("eq broke")

    __hash__ = object.__hash__


@pytest.mark.parametrize("logger, name, error", [
    (_Exits(), "exits", "SystemExit: 3"),
    (_BadName(), "_BadName", "OSError: disk full"),
    (_BadError(), "bad-error", "_BadText"),
])
def test_a_misbehaving_logger_is_disabled_and_sampling_goes_on(core_plugins, make_call, logger, name, error):
    s = Session({"loggers": []}, core_plugins)
    s.loggers.loggers[:] = [logger]
    q, k, v = _qkv()
    for run in range(2):
        s.run_start(num_steps=1)
        s.attention(q, k, v, make_call(step_index=0))
        s.run_end()
    s.close()
    assert s.loggers.disabled == {name: error} and s.loggers.loggers == []


def test_allow_is_a_gate_decision(core_plugins, make_call):
    """A gate that allows does not count as a failure."""
    s = _session(core_plugins, gates=[Gate(lambda call: ALLOW, "fine")])
    q, k, v = _qkv()
    assert float(s.attention(q, k, v, make_call()).mean()) == 7.0 and not s.stats["single:0"].fallbacks
