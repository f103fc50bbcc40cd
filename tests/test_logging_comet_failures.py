"""A failing Comet never breaks sampling: comet_ml missing, no API key, network failure, rate limiting
each give one warning, the comet logger switches itself off, and the run goes on. Also the throttle
that keeps the logger under Comet's rate limits while the final step of every scope still arrives."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from attnplug.core import Session

os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")  # before comet_ml's import: no error reports

_spec = importlib.util.spec_from_file_location("logging_comet_helpers_failures",
                                               Path(__file__).with_name("logging_comet_helpers.py"))
h = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(h)  # type: ignore[union-attr]
clean_comet = h.clean_comet


class Recorder:
    name = "recorder"

    def __init__(self):
        self.events = []

    def log_metrics(self, metrics, step, scope):
        self.events.append((scope, step))

    def run_event(self, event, info):
        self.events.append((event, info["index"]))

    def close(self):
        self.events.append("closed")


def _sample(comet: dict, make_call, runs: int = 2, steps: int = 3) -> tuple[Session, Recorder, list[torch.Tensor]]:
    """Sampling runs on an exact session with a comet logger and a recording one; returns both and the outputs."""
    s = Session({"backend": "sdpa", "exact": "sdpa", "checkpoint": "ckpt/model.safetensors",
                 "loggers": [{"kind": "comet", **comet}]}, h.comet_plugins())
    rec = Recorder()
    s.loggers.loggers.append(rec)
    q = torch.randn(1, 2, 8, 8)
    outs = []
    for _ in range(runs):
        s.run_start(num_steps=steps)
        for step in range(steps):
            outs.append(s.attention(q, q, q, make_call("single:0", step_index=step)))
        s.run_end()
    s.close()
    return s, rec, outs


def _check_went_on(s: Session, rec: Recorder, outs: list[torch.Tensor], caplog, reason: str) -> None:
    assert len(outs) == 6 and all(torch.isfinite(o).all() for o in outs)
    assert [e for e in rec.events if e in (("run_start", 0), ("run_end", 1))] == [("run_start", 0), ("run_end", 1)]
    assert rec.events[-1] == "closed" and ("session", 1) in rec.events
    assert reason in s.summary()["loggers_disabled"]["comet"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "comet" in r.getMessage()
                and r.name == "attnplug"]
    assert len(warnings) == 1 and reason in warnings[0] and "sampling goes on" in warnings[0], warnings


def test_comet_ml_missing(clean_comet, make_call, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "comet_ml", None)  # `import comet_ml` raises ImportError
    with caplog.at_level(logging.WARNING):
        s, rec, outs = _sample({"offline": True}, make_call)
    _check_went_on(s, rec, outs, caplog, "comet_ml is not installed (pip install 'attnplug[comet]')")


def test_no_api_key(clean_comet, make_call, caplog):
    pytest.importorskip("comet_ml")
    with caplog.at_level(logging.WARNING):
        s, rec, outs = _sample({}, make_call)
    _check_went_on(s, rec, outs, caplog, "no Comet API key: set COMET_API_KEY")


def test_network_failure_at_start(clean_comet, make_call, caplog, monkeypatch):
    """What comet_ml.start raises when the server cannot be reached (after its own retries)."""
    comet_ml = pytest.importorskip("comet_ml")
    import requests

    def unreachable(**kwargs):
        raise requests.ConnectionError("HTTPSConnectionPool(host='www.comet.com', port=443): Max retries exceeded")

    monkeypatch.setenv("COMET_API_KEY", "k" * 32)
    monkeypatch.setattr(comet_ml, "start", unreachable)
    with caplog.at_level(logging.WARNING):
        s, rec, outs = _sample({}, make_call)
    _check_went_on(s, rec, outs, caplog, "ConnectionError: HTTPSConnectionPool")


def test_rate_limited_mid_run(clean_comet, make_call, caplog, monkeypatch):
    """The experiment starts (offline, real comet_ml), then logging raises Comet's 429 error: the logger stops
    calling comet_ml after that one failure."""
    comet_ml = pytest.importorskip("comet_ml")
    import requests
    from comet_ml.exceptions import CometRestApiException

    real_start, calls = comet_ml.start, []

    def start(**kwargs):
        experiment = real_start(**kwargs)

        def throttled(values, step=None, **kw):
            calls.append(step)
            response = requests.Response()
            response.status_code, response._content = 429, b'{"msg": "Too Many Requests"}'
            raise CometRestApiException("POST", response)

        experiment.log_metrics = throttled
        return experiment

    monkeypatch.setattr(comet_ml, "start", start)
    with caplog.at_level(logging.WARNING):
        s, rec, outs = _sample({"offline": True}, make_call)
    _check_went_on(s, rec, outs, caplog, "CometRestApiException")
    assert len(calls) == 1


def test_throttle_keeps_under_budget_and_sends_the_last_step_of_each_scope(clean_comet, monkeypatch):
    pytest.importorskip("comet_ml")
    from attnplug.plugins.logging_comet.logger import CometLogger
    from attnplug.plugins.logging_comet.settings import CometSettings

    now = [0.0]
    s = Session({"loggers": [], "checkpoint": "ckpt/m.safetensors"}, h.comet_plugins())
    logger = CometLogger(CometSettings(offline=True, offline_directory="archives", max_metrics_per_minute=60),
                         s.config, clock=lambda: now[0])
    logger.run_event("run_start", {"index": 0})
    for step in range(100):  # 3 values per event, 100 events in 10 s: 10 s of budget is 10 values
        now[0] = step * 0.1
        logger.log_metrics({"loss": 1.0 / (step + 1), "cos": 0.5, "ready": True, "note": "text"}, step, "distill")
        if step % 10 == 0:
            logger.log_metrics({"layer": "single:3", "loss": float(step)}, step, "distill/layer")
    logger.log_metrics({"updates": 7}, 3, "distill/every")  # hold one back in another scope too
    logger.run_event("run_end", {"index": 0})
    logger.close()
    (archive,) = h.read_archives(clean_comet / "archives")
    sent = archive.steps("distill/loss")
    assert sent[-1] == 99  # the final step, held back, sent at run end
    assert len(sent) <= 1 + (60 + 10) // 3  # the initial bucket of 60 values plus 10 s of refill, then the final one
    assert archive.metrics()[("distill/loss", 99)] == pytest.approx(0.01)
    assert archive.metrics()[("distill/ready", 0)] == 1.0 and not any(n == "distill/note" for n, _ in archive.metrics())
    assert archive.steps("distill/layer/single:3/loss")[-1] == 90 and archive.steps("distill/every/updates") == [3]

    every = CometLogger(CometSettings(offline=True, offline_directory="every", log_every=4, experiment_name="every"),
                        s.config)  # another experiment: its steps start at 0
    for step in range(10):
        every.log_metrics({"loss": float(step)}, step, "distill")
    every.close()
    (archive,) = h.read_archives(clean_comet / "every")
    assert archive.steps("distill/loss") == [0, 4, 8, 9]  # one in four, and the last one at close
    s.close()


def test_two_experiments_in_one_process_take_turns_without_losing_data(clean_comet):
    """comet_ml ends the running experiment when another key starts; the first logger starts its own again."""
    pytest.importorskip("comet_ml")
    from attnplug.plugins.logging_comet.logger import CometLogger
    from attnplug.plugins.logging_comet.settings import CometSettings

    s = Session({"loggers": [], "checkpoint": "ckpt/m.safetensors"}, h.comet_plugins())
    a, b = (CometLogger(CometSettings(offline=True, offline_directory="archives", experiment_name=n), s.config)
            for n in ("a", "b"))
    a.log_metrics({"loss": 1.0}, 0, "distill")
    b.log_metrics({"loss": 2.0}, 0, "distill")  # ends a's experiment
    a.log_metrics({"loss": 0.5}, 1, "distill")
    a.close()
    b.close()
    s.close()
    by_key: dict[str, dict] = {}
    for archive in h.read_archives(clean_comet / "archives"):
        by_key.setdefault(archive.experiment["offline_id"], {}).update(archive.metrics())
    assert by_key[a.key] == {("distill/loss", 0): 1.0, ("distill/loss", 1): 0.5}
    assert by_key[b.key] == {("distill/loss", 0): 2.0}
