"""Images through the logger fan-out, the JSONL logger's scopes, and the per-run serving statistics."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from attnplug.core import Session
from attnplug.core.backend import Backend, Capabilities
from attnplug.core.loggers import ImageLogger, LoggerFanout, image_grid


class Recorder:
    name = "recorder"

    def __init__(self):
        self.metrics, self.images = [], []

    def log_metrics(self, metrics, step, scope):
        self.metrics.append((scope, step, dict(metrics)))

    def run_event(self, event, info):
        pass

    def close(self):
        pass


class ImageRecorder(Recorder):
    name = "images"

    def log_image(self, name, image, step, scope):
        self.images.append((scope, name, step, image_grid(image)))


class BrokenImages(Recorder):
    name = "broken-images"

    def log_image(self, name, image, step, scope):
        raise OSError("disk full")


def test_image_grid_tiles_a_batch_and_converts_floats():
    batch = torch.zeros(3, 4, 5, 3)
    batch[1] = 1.0
    batch[2] = 0.5
    grid = image_grid(batch, columns=2)
    assert grid.dtype == np.uint8 and grid.shape == (8, 10, 3)
    assert grid[0:4, 0:5].max() == 0 and grid[0:4, 5:10].min() == 255 and grid[4:8, 0:5].min() == 128
    assert grid[4:8, 5:10].max() == 0  # the empty cell
    assert image_grid(np.full((2, 2, 1), 7, dtype=np.uint8)).shape == (2, 2, 1)
    with pytest.raises(ValueError, match=r"shape \(1, 3, 8, 8\)"):
        image_grid(torch.zeros(1, 3, 8, 8))  # channels first
    with pytest.raises(ValueError, match="dtype int64"):
        image_grid(np.zeros((2, 2, 3), dtype=np.int64))


def test_fanout_hands_images_only_to_loggers_that_take_them(caplog):
    plain, takes, broken = Recorder(), ImageRecorder(), BrokenImages()
    assert isinstance(takes, ImageLogger) and not isinstance(plain, ImageLogger)
    fan = LoggerFanout([plain, broken, takes])
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        fan.log_image("grid", torch.rand(2, 4, 4, 3), 5, "samples")
        fan.log_image("grid", torch.rand(4, 4, 3), 6, "samples")
    assert [(s, n, st, g.shape) for s, n, st, g in takes.images] == [("samples", "grid", 5, (4, 8, 3)),
                                                                      ("samples", "grid", 6, (4, 4, 3))]
    assert fan.loggers == [plain, takes]  # the plain logger stays, the broken one is disabled once
    assert "broken-images" in fan.disabled and "disk full" in fan.disabled["broken-images"]
    assert sum("broken-images" in r.getMessage() for r in caplog.records) == 1
    fan.log_metrics({"x": 1}, 0, "session")
    assert plain.metrics == [("session", 0, {"x": 1})]


def test_jsonl_keeps_every_metric_of_selected_scopes(core_plugins, tmp_path):
    path = tmp_path / "run.jsonl"
    s = Session({"loggers": [{"kind": "jsonl", "path": str(path), "scopes": ["distill", "session/*"]}]}, core_plugins)
    snap = {f"loss/{q}": 0.1 for q in ("min", "p25", "p50", "p75", "max")} | {"nmse/p50": float("nan")}
    s.loggers.log_metrics(snap, 3, "distill")
    s.loggers.log_metrics({"calls": 1}, 0, "session")  # not selected: only its sub-scopes are
    s.loggers.log_metrics({"layer": "single:0", "calls": 1}, 0, "session/layer")
    s.close()
    records = [json.loads(line) for line in path.read_text().splitlines() if "scope" in line]
    assert [r["scope"] for r in records] == ["distill", "session/layer"]
    assert records[0]["metrics"] == {**{f"loss/{q}": 0.1 for q in ("min", "p25", "p50", "p75", "max")},
                                     "nmse/p50": None}


class Flaky(Backend):
    """Approximate; raises on layer single:1, serves every other layer."""

    name = "flaky"
    capabilities = Capabilities(exact=False, mask_kinds=("none",))

    def forward(self, q, k, v, call, mask=None):
        if call.layer_key == "single:1":
            raise RuntimeError("kernel exploded")
        return q.clone()


def test_run_end_logs_this_runs_serving_statistics_per_layer_and_reason(core_plugins, make_call):
    s = Session({"backend": "sdpa", "exact": "sdpa", "loggers": []}, core_plugins)
    s.backends.add(Flaky(), "test")
    s.router.primary = "flaky"
    rec = Recorder()
    s.loggers.loggers[:] = [rec]
    q = torch.randn(1, 2, 6, 8)
    for run, steps in enumerate((3, 2)):
        s.run_start(num_steps=steps)
        for step in range(steps):
            for layer in ("single:0", "single:1"):
                s.attention(q, q, q, make_call(layer, step_index=step))
        s.run_end()
    per_layer = {(step, m["layer"]): m for scope, step, m in rec.metrics if scope == "session/layer"}
    assert per_layer[(0, "single:0")] == {"layer": "single:0", "calls": 3, "served/flaky": 3, "fallbacks": 0}
    assert per_layer[(0, "single:1")] == {"layer": "single:1", "calls": 3, "served/sdpa": 3, "fallback/error": 3,
                                          "fallbacks": 3}
    assert per_layer[(1, "single:1")]["calls"] == 2 and per_layer[(1, "single:1")]["fallback/error"] == 2  # this run only
    totals = [(step, m) for scope, step, m in rec.metrics if scope == "session"]
    assert [step for step, _ in totals] == [0, 1]
    assert totals[1][1] == {"calls": 4, "approximate_calls": 2, "approximate_share": 0.5, "fallbacks": 2,
                            "fallback/error": 2, "served/flaky": 2, "served/sdpa": 2}
