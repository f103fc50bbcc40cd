"""The comet logger through the real comet_ml in offline mode: what a distillation writes into the
archive (parameters, metrics, steps, images), experiment keys that continue one experiment per
checkpoint, and an API key that appears nowhere."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")  # before comet_ml's import: no error reports
comet_ml = pytest.importorskip("comet_ml")

from attnplug.core import ConfigError, Plugins, Session  # noqa: E402

_here = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("logging_comet_helpers_offline", _here / "logging_comet_helpers.py")
h = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(h)  # type: ignore[union-attr]
clean_comet = h.clean_comet
_spec = importlib.util.spec_from_file_location("distill_fakes_comet", _here / "test_distill_fakes.py")
fk = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fk)  # type: ignore[union-attr]

pytestmark = pytest.mark.usefixtures("one_thread")
SECRET = "attnplugTestKey0123456789abcdefXYZ"  # shaped like a Comet key, so a leak would be found verbatim


def _config(folder: Path, training: bool = True, **comet) -> dict:
    comet = {"kind": "comet", "offline": True, "offline_directory": str(folder / "archives"), **comet}
    cfg = {"backend": "ttr", "exact": "sdpa", "training": training, "checkpoint": str(folder / "ckpt" / "flux.safetensors"),
           "loggers": [comet],
           "plugins": {"ttr": {"feature_dim": 16, "depth": 1, "key_chunk": 32, "query_chunk": 32}}}
    if training:
        cfg["distiller"] = "ttr"
        cfg["plugins"]["distill"] = {"query_cap": 32, "log_every": 4, "layer_log_every": 2, "min_swap_layers": 2}
    return cfg


def _plugins() -> Plugins:
    plugins = Plugins(load_entry_points=False)
    if "ttr" not in plugins.collect("distiller").entries:
        pytest.skip("needs the ttr distiller (plugins/ttr)")
    return plugins


def _distill(session: Session, runs: int = 2, steps: int = 3) -> None:
    fk.run_sampling(session, runs=runs, steps=steps, layers=["single:0", "single:1"],
                    gen=torch.Generator().manual_seed(0), n=48)


def test_a_distillation_writes_parameters_metrics_steps_and_images(clean_comet):
    s = Session(_config(clean_comet, experiment_name="flux-distill", tags=["test"]), _plugins())
    logger = s.loggers.loggers[0]
    _distill(s)
    s.loggers.log_image("grid", torch.rand(2, 8, 8, 3), 5)
    updates = s.distiller.total_updates
    s.close()
    assert s.summary()["loggers_disabled"] == {}
    (archive,) = h.read_archives(clean_comet / "archives")
    assert archive.experiment["offline_id"] == logger.key and len(logger.key) == 40 and logger.key.isalnum()
    assert archive.experiment["project_name"] == "attnplug" and archive.experiment["tags"] == ["test"]
    assert archive.others()["Name"] == "flux-distill"

    params = archive.parameters()
    assert params["backend"] == "ttr" and params["training"] is True
    assert params["plugins.distill.query_cap"] == 32 and params["plugins.ttr.feature_dim"] == 16
    assert params["loggers.0.kind"] == "comet" and params["loggers.0.offline"] is True
    assert not any("api_key" in name for name in params)

    metrics = archive.metrics()
    snapshot_steps = archive.steps("distill/updates")
    assert snapshot_steps and snapshot_steps[-1] == updates  # run end's snapshot at the last update
    assert all(metrics[("distill/updates", st)] == st for st in snapshot_steps)
    for name in ("distill/loss/p50", "distill/ema_cos/max", "distill/ready_layers", "distill/layer/single:0/loss",
                 "distill/layer/single:1/cos_mean", "distill/layer/single:0/ema_cos",
                 "distill/readiness/single:1/ema_cos", "distill/readiness/single:0/ready"):
        assert archive.steps(name), name
    # serving statistics per run (step = run index): totals and per layer and backend
    assert len(archive.steps("distill/readiness/single:0/ema_cos")) == 2  # every layer at each run's flush
    assert archive.steps("session/calls") == [0, 1]
    assert metrics[("session/calls", 1)] == 6 and metrics[("session/fallbacks", 1)] == 0
    assert metrics[("session/layer/single:1/served/sdpa", 0)] == 3
    assert archive.images() == [("samples/grid", 5)]


def test_sessions_on_one_checkpoint_continue_one_experiment(clean_comet):
    plugins = _plugins()
    keys = []
    for _ in range(2):  # as ComfyUI rebuilds the session for every queued run
        s = Session(_config(clean_comet), plugins)
        keys.append(s.loggers.loggers[0].key)
        _distill(s, runs=1, steps=2)
        s.save()
        s.close()
    first, second = h.read_archives(clean_comet / "archives")
    assert keys[0] == keys[1] == first.experiment["offline_id"] == second.experiment["offline_id"]
    assert first.experiment["resume_strategy"] == "get_or_create"
    # the distiller's steps continue from the checkpoint; the per-session run index continues after the last one
    assert min(second.steps("distill/updates")) > max(first.steps("distill/updates"))
    assert first.steps("session/calls") == [0] and second.steps("session/calls") == [1]
    assert second.parameters()  # each archive carries the parameters

    other_name = Session(_config(clean_comet, experiment_name="second-try"), plugins).loggers.loggers[0].key
    serving = Session(_config(clean_comet, training=False), plugins).loggers.loggers[0].key
    explicit = Session(_config(clean_comet, experiment_key="A" * 36), plugins).loggers.loggers[0].key
    assert len({keys[0], other_name, serving, explicit}) == 4 and explicit == "A" * 36


@pytest.mark.parametrize("key, problem", [("short1", "6 characters"), ("x" * 40 + "-", "41 characters including others")])
def test_a_bad_experiment_key_is_refused_before_any_work(key, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        Session({"loggers": [{"kind": "comet", "experiment_key": key}]}, h.comet_plugins())
    assert "experiment_key" in str(err.value) and "32-50 letters and digits" in str(err.value)


def test_the_api_key_appears_in_no_parameter_archive_checkpoint_log_line_or_error(clean_comet, capsys, caplog,
                                                                                    monkeypatch):
    monkeypatch.setenv("COMET_API_KEY", SECRET[::-1])  # comet_ml's own key must stay hidden too
    cfg = _config(clean_comet, api_key=SECRET)
    cfg["loggers"] += [{"kind": "console", "scopes": ["*"], "verbose": True},
                       {"kind": "jsonl", "path": str(clean_comet / "run.jsonl")}]
    with caplog.at_level(logging.DEBUG):
        s = Session(cfg, _plugins())
        _distill(s, runs=1)
        s.save()
        s.close()
        # an online session whose key the server refuses (comet_ml puts the key into the exception)
        monkeypatch.setattr(comet_ml, "start",
                            lambda **kw: (_ for _ in ()).throw(comet_ml.exceptions.InvalidAPIKey(kw["api_key"],
                                                                                                "comet.com")))
        online = Session(_config(clean_comet, offline=False, api_key=SECRET), _plugins())
        _distill(online, runs=1, steps=1)
        online.close()
        bad = {"loggers": [{"kind": "comet", "api_key": 1234567890123}]}
        with pytest.raises(ConfigError) as err:
            Session(bad, h.comet_plugins())
    assert "comet" in online.summary()["loggers_disabled"]
    seen = capsys.readouterr()
    texts = {"stdout": seen.out, "stderr": seen.err, "log": "\n".join(r.getMessage() for r in caplog.records),
             "disabled": json.dumps(online.summary()), "config error": str(err.value),
             "jsonl": (clean_comet / "run.jsonl").read_text()}
    assert "[attnplug distill @" in seen.err  # the verbose console printed every metric
    assert "1234567890123" not in texts["config error"] and "api_key" in texts["config error"]
    for secret in (SECRET, SECRET[::-1]):
        for where, text in texts.items():
            assert secret not in text, where
        for archive in h.read_archives(clean_comet / "archives"):
            for member, data in archive.raw.items():
                assert secret.encode() not in data, f"{archive.path.name}/{member}"
        assert secret.encode() not in (clean_comet / "ckpt" / "flux.safetensors").read_bytes()
    assert "InvalidAPIKey" in texts["disabled"]  # the reason is kept, the key is not


def test_building_a_session_with_a_comet_logger_does_not_import_comet_ml(tmp_path):
    code = ("import sys, attnplug\n"
            "from attnplug.core import Session\n"
            f"s = Session({{'loggers': [{{'kind': 'comet', 'offline': True}}], 'checkpoint': {str(tmp_path / 'c.st')!r}}})\n"
            "assert 'comet' in s.plugins.collect('logger').names()\n"
            "assert 'comet_ml' not in sys.modules, 'comet_ml imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)
