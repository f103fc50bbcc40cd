"""The online distiller on the real `ttr` backend (with the landmark residual): the training
contract end to end, the chunk shrink after an out-of-memory, and a checkpoint round trip."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from attnplug.core import Plugins, Session, hookimpl

_spec = importlib.util.spec_from_file_location(
    "distill_fakes_ttr", Path(__file__).with_name("test_distill_fakes.py")
)
fk = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fk)  # type: ignore[union-attr]

ttr_backend = pytest.importorskip("attnplug.plugins.ttr.backend")


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest)


class DistillOnly:
    """Registers the distiller and its [plugins.distill] section unless the ttr plugin already does."""

    @hookimpl
    def attnplug_register_distillers(self, registrar: Any) -> None:
        from attnplug.plugins.ttr.distill import register_distiller

        register_distiller(registrar, name="ttr")

    @hookimpl
    def attnplug_config_sections(self) -> dict[str, Any]:
        from attnplug.plugins.ttr.distill import DistillSettings

        return {"distill": DistillSettings}


def make_session(distill: dict[str, Any], **root: Any) -> Session:
    plugins = Plugins(load_entry_points=False)
    if "ttr" not in plugins.collect("distiller").entries:
        plugins.register(DistillOnly(), name="distill_only")
    cfg = {
        "backend": "ttr",
        "exact": "sdpa",
        "training": True,
        "distiller": "ttr",
        "loggers": [],
        "seed": 0,
        "plugins": {
            "ttr": {"feature_dim": 16, "depth": 1, "key_chunk": 32, "query_chunk": 32},
            "distill": {
                "lr": 1e-2,
                "lr_logvar": 1e-2,
                "query_cap": 32,
                "log_every": 0,
                "layer_log_every": 4,
                "min_swap_layers": 2,
                **distill,
            },
        },
    }
    cfg.update(root)
    return Session(cfg, plugins)


def test_ttr_trains_online_and_loss_falls(tmp_path):
    s = make_session({})
    gen = torch.Generator().manual_seed(0)
    fk.run_sampling(s, runs=1, steps=6, layers=["single:0", "single:1"], gen=gen, n=48)
    first = dict(s.distiller.readiness["single:0"].__dict__)
    fk.run_sampling(s, runs=5, steps=6, layers=["single:0", "single:1"], gen=gen, n=48)
    r = s.distiller.readiness["single:0"]
    assert not any(st.fallbacks for st in s.stats.values()), [st.fallbacks for st in s.stats.values()]
    assert r.updates == 36 and r.ema_cos < first["ema_cos"]
    m = s.distiller.metrics["single:0"]
    assert "nmse" in m and "cos_p5" in m
    groups = {g["name"] for g in s.distiller.trainers["single:0"].opt.param_groups}
    assert groups == {"phi", "alpha"}

    path = tmp_path / "ttr.safetensors"
    s.save(path)
    s2 = make_session({})
    s2.load(path)
    assert s2.distiller.readiness["single:0"].to_json() == r.to_json()
    fk.run_sampling(s2, runs=1, steps=2, layers=["single:0", "single:1"], gen=gen, n=48)
    assert s2.distiller.readiness["single:0"].updates == 38
    assert not any(st.fallbacks for st in s2.stats.values())


def test_ttr_out_of_memory_shrinks_its_chunks(monkeypatch):
    s = make_session({"oom_min_key_chunk": 8, "oom_min_query_chunk": 8, "oom_min_query_cap": 8})
    student = s.backends.get("ttr")
    real = student.train_forward
    budget = {"n": 1}

    def flaky(*args, **kwargs):
        if budget["n"] > 0:
            budget["n"] -= 1
            raise torch.cuda.OutOfMemoryError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(student, "train_forward", flaky)
    gen = torch.Generator().manual_seed(1)
    fk.run_sampling(s, runs=1, steps=1, layers=["single:0"], gen=gen, n=48)
    assert student.layer_chunks("single:0") == (16, 16)
    assert s.distiller.query_caps["single:0"] == 16
    fk.run_sampling(s, runs=1, steps=2, layers=["single:0"], gen=gen, n=48)
    assert s.distiller.readiness["single:0"].updates == 2
