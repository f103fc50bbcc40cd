"""Gate semantics: veto/force combination (fail-closed), schedules, step ranges, caching."""
from __future__ import annotations

import pytest

from attnplug.core import Session
from attnplug.core.config import ConfigError
from attnplug.core.gates import ALLOW, Router, force, veto
from attnplug.core.patterns import layer_matches, step_in_range


class FixedGate:
    def __init__(self, name, decision):
        self.name, self.decision, self.calls = name, decision, 0

    def decide(self, call):
        self.calls += 1
        return self.decision


def _router(session, gates, primary="approx"):
    return Router(gates, session.backends, primary, "sdpa")


@pytest.fixture
def session(core_plugins):
    from attnplug.core.backend import Backend, Capabilities

    class Approx(Backend):
        name = "approx"
        capabilities = Capabilities(exact=False)

        def forward(self, q, k, v, call, mask=None):
            return v

    s = Session({"backend": "sdpa", "exact": "sdpa", "loggers": []}, core_plugins)
    s.backends.add(Approx(), "test")
    return s


@pytest.mark.parametrize("decisions, expected", [
    ([], "approx"),
    ([ALLOW, ALLOW], "approx"),
    ([ALLOW, veto("no")], "sdpa"),
    ([veto("no"), force("approx", "yes")], "sdpa"),          # a veto beats forcing an approximate backend
    ([veto("no"), force("host", "exact wins")], "host"),      # forcing an exact backend wins outright
    ([force("approx", "a"), force("host", "h")], "host"),
    ([force("host", "h"), force("sdpa", "s")], "host"),       # first exact force wins
])
def test_gate_truth_table(session, make_call, decisions, expected):
    gates = [FixedGate(f"g{i}", d) for i, d in enumerate(decisions)]
    assert _router(session, gates).decide(make_call()).backend == expected


def test_not_ready_learned_backend_goes_exact(session, make_call):
    from attnplug.core.backend import LearnedBackend

    class Learned(LearnedBackend):
        name = "learned"

    session.backends.add(Learned(), "test")
    router = _router(session, [], primary="learned")
    route = router.decide(make_call("single:1"))
    assert route.backend == "sdpa" and "not ready" in route.reason
    session.backends.get("learned").ready["single:1"] = True
    assert router.decide(make_call("single:1")).backend == "learned"


def test_decisions_cached_per_step_and_layer(session, make_call):
    gate = FixedGate("g", ALLOW)
    router = _router(session, [gate])
    for _ in range(5):
        router.route(make_call("single:0", step_index=0))
    router.route(make_call("single:1", step_index=0))
    assert gate.calls == 2
    router.route(make_call("single:0", step_index=1))
    assert gate.calls == 3


@pytest.mark.parametrize("pattern, key, ok", [
    ("single:*", "single:3", True), ("single:*", "double:3", False), ("single:3-5", "single:5", True),
    ("single:3-5", "single:6", False), ("double:0", "double:0", True), ("*", "other:x", True),
])
def test_layer_patterns(pattern, key, ok):
    assert layer_matches(pattern, key) is ok


@pytest.mark.parametrize("spec, step, total, inside", [
    (":2", 1, 20, True), (":2", 2, 20, False), ("-2:", 18, 20, True), ("-2:", 17, 20, False),
    ("3-5", 5, None, True), ("5:", 4, None, False), ("-2:", 18, None, None), ("3", None, 20, None),
])
def test_step_ranges(spec, step, total, inside):
    assert step_in_range(spec, step, total) is inside


def _schedule_session(core_plugins, rules, backend="sdpa"):
    return Session({"backend": backend, "exact": "sdpa", "loggers": [],
                    "gates": [{"kind": "schedule", "rules": rules}]}, core_plugins)


def test_schedule_exact_first_and_last_two_steps(core_plugins, make_call):
    s = _schedule_session(core_plugins, [{"steps": ":2", "backend": "host"}, {"steps": "-2:", "backend": "host"},
                                         {"layers": ["double:*"], "backend": "host"}])
    got = {step: s.router.decide(make_call("single:0", step_index=step, num_steps=10)).backend for step in range(10)}
    assert [step for step, b in got.items() if b == "host"] == [0, 1, 8, 9]
    assert s.router.decide(make_call("double:0", step_index=5, num_steps=10)).backend == "host"
    # unknown step count: the exact-forcing '-N:' rule applies (fail-closed)
    assert s.router.decide(make_call("single:0", step_index=5, num_steps=None)).backend == "host"


def test_sigma_window_and_layer_filter(core_plugins, make_call, session):
    s = Session({"backend": "sdpa", "exact": "sdpa", "loggers": [],
                 "gates": [{"kind": "sigma_window", "min": 0.2, "max": 0.8},
                           {"kind": "layers", "include": ["single:*"], "exclude": ["single:0"]}]}, core_plugins)
    sigma, layers = s.router.gates
    assert sigma.decide(make_call(sigma=0.5)).verdict == "allow"
    assert sigma.decide(make_call(sigma=0.9)).verdict == "veto"
    assert sigma.decide(make_call(sigma=None)).verdict == "veto"  # unknown sigma: fail-closed
    assert layers.decide(make_call("single:0")).verdict == "veto"
    assert layers.decide(make_call("single:2")).verdict == "allow"
    assert layers.decide(make_call("double:2")).verdict == "veto"


def test_bad_gate_settings_are_config_errors(core_plugins):
    with pytest.raises(ConfigError) as err:
        Session({"gates": [{"kind": "sigma_window", "min": 0.9, "max": 0.1},
                           {"kind": "schedule", "rules": [{"steps": "x-y", "backend": "sdpa"}]},
                           {"kind": "nope"}]}, core_plugins)
    text = str(err.value)
    assert "[gates[0] (kind 'sigma_window')]" in text and "must not exceed max" in text
    assert "[gates[1] (kind 'schedule')] rules.0.steps" in text and "step range 'x-y'" in text
    assert "[gates[2]] kind: unknown gate kind 'nope'" in text


def test_tokens_gate_serves_approximate_only_within_the_image_size_range(core_plugins, make_call, session):
    """`kind = "tokens"`: a Flux config can keep exact attention at sizes where the approximation is slower."""
    s = Session({"backend": "sdpa", "exact": "sdpa", "loggers": [],
                 "gates": [{"kind": "tokens", "min_image_tokens": 8192, "max_image_tokens": 65536}]}, core_plugins)
    (gate,) = s.router.gates
    assert gate.decide(make_call(n_image_tokens=4096)).verdict == "veto"  # 1024²: exact
    assert gate.decide(make_call(n_image_tokens=16384)).verdict == "allow"  # 2048²
    assert gate.decide(make_call(n_image_tokens=65536)).verdict == "allow"  # the bound is inclusive
    assert gate.decide(make_call(n_image_tokens=65537)).verdict == "veto"
    # routes are cached per image size too: the same layer and step at two sizes get two decisions
    router = _router(session, [gate])
    assert router.route(make_call("single:0", n_image_tokens=4096)).backend == "sdpa"
    assert router.route(make_call("single:0", n_image_tokens=16384)).backend == "approx"


def test_tokens_gate_rejects_an_empty_range(core_plugins):
    with pytest.raises(ConfigError, match="min_image_tokens"):
        Session({"backend": "sdpa", "exact": "sdpa", "loggers": [],
                 "gates": [{"kind": "tokens", "min_image_tokens": 10, "max_image_tokens": 5}]}, core_plugins)
