"""One test per hookspec (a meta-test keeps it that way), with fake plugins as fixtures."""
from __future__ import annotations

import inspect

import pytest
import torch
from pydantic import Field

from attnplug.core import Session, Strict, hookimpl, hookspecs
from attnplug.core.backend import Backend, Capabilities
from attnplug.core.gates import veto


class HalfSettings(Strict):
    factor: float = Field(0.5, gt=0)


class Scaled(Backend):
    name = "scaled"
    capabilities = Capabilities(exact=False)

    def __init__(self, factor):
        self.factor = factor

    def forward(self, q, k, v, call, mask=None):
        return v * self.factor


class FakePlugin:
    """Implements every hook and records lifecycle events."""

    def __init__(self):
        self.events = []

    @hookimpl
    def attnplug_config_sections(self):
        return {"fake": HalfSettings}

    @hookimpl
    def attnplug_register_backends(self, registrar):
        registrar.add("scaled", lambda settings, session: Scaled(settings.factor), doc="v × factor")

    @hookimpl
    def attnplug_register_gates(self, registrar):
        class NoDouble:
            name = "no_double"

            def decide(self, call):
                from attnplug.core.gates import ALLOW
                return veto("double blocks stay exact") if call.block_type == "double" else ALLOW

        registrar.add("no_double", lambda s, session: NoDouble())

    @hookimpl
    def attnplug_register_distillers(self, registrar):
        plugin = self

        class Counting:
            name = "counting"

            def __init__(self):
                self.seen = []

            def wants(self, call):
                return call.layer_key == "single:0"

            def observe(self, call, q, k, v, teacher, mask):
                self.seen.append((call.layer_key, teacher.shape))

            def step_start(self, step_index, sigma):
                plugin.events.append(("distiller.step", step_index))

            def run_start(self, run):
                pass

            def run_end(self, run):
                plugin.events.append(("distiller.run_end", run.index))

            def state(self):
                return {"seen": torch.tensor(len(self.seen))}, {"kind": "counting"}

            def load_state(self, tensors, meta):
                pass

        registrar.add("counting", lambda s, session: Counting())

    @hookimpl
    def attnplug_register_loggers(self, registrar):
        plugin = self

        class ListLogger:
            name = "list"

            def log_metrics(self, metrics, step, scope):
                plugin.events.append(("metrics", scope))

            def run_event(self, event, info):
                plugin.events.append(("event", event))

            def close(self):
                plugin.events.append(("logger.close",))

        registrar.add("list", lambda s, session: ListLogger())

    @hookimpl
    def attnplug_register_quality_terms(self, registrar):
        class MeanGap:
            name = "mean_gap"
            better = "lower"
            needs = frozenset({"latent"})

            def score(self, candidate, reference):
                return (candidate.latent - reference.latent).flatten(1).abs().mean(1)

        registrar.add("mean_gap", lambda s, session: MeanGap(), doc="mean absolute latent gap")

    @hookimpl
    def attnplug_session_start(self, session):
        self.events.append(("session_start",))

    @hookimpl
    def attnplug_run_start(self, session, run):
        self.events.append(("run_start", run.index, run.num_steps))

    @hookimpl
    def attnplug_step_start(self, session, step_index, sigma):
        self.events.append(("step_start", step_index, sigma))

    @hookimpl
    def attnplug_run_end(self, session, run):
        self.events.append(("run_end", run.index))

    @hookimpl
    def attnplug_session_close(self, session):
        self.events.append(("session_close",))


@pytest.fixture
def fake(core_plugins):
    plugin = FakePlugin()
    core_plugins.register(plugin, name="fake")
    return plugin


def _session(core_plugins, **extra):
    cfg = {"backend": "scaled", "exact": "sdpa", "loggers": [{"kind": "list"}], "plugins": {"fake": {"factor": 3.0}}}
    cfg.update(extra)
    return Session(cfg, core_plugins)


def test_hook_attnplug_config_sections(core_plugins, fake):
    s = _session(core_plugins)
    assert s.config.section("fake").factor == 3.0
    from attnplug.core.config import ConfigError
    with pytest.raises(ConfigError, match=r"\[plugins.fake\] factor: got -1"):
        _session(core_plugins, plugins={"fake": {"factor": -1}})


def test_hook_attnplug_register_backends(core_plugins, fake, make_call):
    s = _session(core_plugins)
    assert s.backends.entries["scaled"].plugin == "fake"
    q = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(s.attention(q, q, q, make_call()), q * 3)


def test_hook_attnplug_register_gates(core_plugins, fake, make_call):
    s = _session(core_plugins, gates=[{"kind": "no_double"}])
    assert s.router.decide(make_call("double:0")).backend == "sdpa"
    assert s.router.decide(make_call("single:0")).backend == "scaled"


def test_hook_attnplug_register_distillers(core_plugins, fake, make_call):
    s = _session(core_plugins, backend="sdpa", training=True, distiller="counting")
    q = torch.randn(1, 2, 5, 8)
    s.attention(q, q, q, make_call("single:0"))
    s.attention(q, q, q, make_call("single:1"))
    assert s.distiller.seen == [("single:0", q.shape)]
    assert s.stats["single:0"].trained == 1 and s.stats["single:1"].trained == 0


def test_hook_attnplug_register_loggers(core_plugins, fake, make_call):
    s = _session(core_plugins)
    s.run_start()
    s.run_end()
    s.close()
    assert ("event", "run_start") in fake.events and ("metrics", "session") in fake.events
    assert fake.events[-1] == ("logger.close",)


def test_hook_attnplug_register_quality_terms(core_plugins, fake):
    from attnplug.core.quality import Sample
    s = _session(core_plugins)
    registrar = s.plugins.collect("quality_term", s.config.root.disable_plugins)
    assert registrar.entries["mean_gap"].plugin == "fake"
    term = registrar.entries["mean_gap"].factory(None, s)
    ref = Sample(latent=torch.zeros(2, 4))
    cand = Sample(latent=torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 2]]))
    torch.testing.assert_close(term.score(cand, ref), torch.tensor([1.0, 0.5]))


def test_hook_attnplug_session_start(core_plugins, fake):
    _session(core_plugins)
    assert fake.events == [("session_start",)]


def test_hook_attnplug_run_start(core_plugins, fake, make_call):
    s = _session(core_plugins)
    s.run_start(num_steps=4)
    assert ("run_start", 0, 4) in fake.events


def test_hook_attnplug_step_start(core_plugins, fake, make_call):
    s = _session(core_plugins)
    q = torch.randn(1, 1, 4, 8)
    for step in range(3):
        for layer in ("double:0", "single:0", "single:1"):
            s.attention(q, q, q, make_call(layer, step_index=step, sigma=1.0 - step / 3))
    steps = [e for e in fake.events if e[0] == "step_start"]
    assert steps == [("step_start", 0, 1.0), ("step_start", 1, 1.0 - 1 / 3), ("step_start", 2, 1.0 - 2 / 3)]


def test_hook_attnplug_run_end(core_plugins, fake, make_call):
    s = _session(core_plugins, backend="sdpa", training=True, distiller="counting")
    q = torch.randn(1, 1, 4, 8)
    for _run in range(2):
        for step in range(3):
            s.attention(q, q, q, make_call(step_index=step))
    s.close()
    assert [e for e in fake.events if e[0] == "run_end"] == [("run_end", 0), ("run_end", 1)]
    assert [e for e in fake.events if e[0] == "distiller.run_end"] == [("distiller.run_end", 0),
                                                                        ("distiller.run_end", 1)]


def test_hook_attnplug_session_close(core_plugins, fake):
    s = _session(core_plugins)
    s.close()
    s.close()  # idempotent
    assert fake.events.count(("session_close",)) == 1


def test_lifecycle_hook_failure_never_breaks_sampling(core_plugins, make_call, caplog):
    class Bad:
        @hookimpl
        def attnplug_step_start(self, session, step_index, sigma):
            raise RuntimeError("boom")

    core_plugins.register(Bad(), name="bad")
    s = Session({"loggers": []}, core_plugins)
    q = torch.randn(1, 1, 4, 8)
    s.attention(q, q, q, make_call())
    assert any("plugin 'bad' failed in attnplug_step_start" in r.getMessage() for r in caplog.records)


def test_every_hookspec_has_a_test():
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("attnplug_")]
    assert len(hooks) >= 10
    tests = {n for n in globals() if n.startswith("test_hook_")}
    missing = [h for h in hooks if f"test_hook_{h}" not in tests]
    assert not missing, f"hookspecs without a test: {missing}"
    for h in hooks:
        doc = getattr(hookspecs, h).__doc__ or ""
        assert ":return:" in doc, f"{h}: docstring must say what the return means"
        params = [p for p in inspect.signature(getattr(hookspecs, h)).parameters]
        assert all(f":param {p}:" in doc for p in params), f"{h}: every argument documented"
