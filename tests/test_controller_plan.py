"""Serving plans: σ bands, storage in checkpoints and files, and the plan gate every session serves through."""
from __future__ import annotations

import logging

import pytest
import torch

from attnplug.core import Session
from attnplug.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from attnplug.plugins.controller.gate import plan_gate
from attnplug.plugins.controller.plan import (PLAN_COMPONENT, ServingPlan, band_index, fingerprint_tensors,
                                              write_plan_into_checkpoint)

EDGES = (1.0, 0.5, 0.2, 0.0)


def test_band_index_follows_the_edges():
    assert [band_index(EDGES, s) for s in (1.5, 1.0, 0.51, 0.5, 0.3, 0.2, 0.1, 0.0)] == [0, 0, 0, 1, 1, 2, 2, 2]


def test_plan_allows_only_its_cells_and_never_an_unknown_sigma():
    plan = ServingPlan.from_cells(EDGES, [("single:0", 2), ("single:1", 1), ("single:1", 2)])
    assert plan.allows("single:0", 0.1) and not plan.allows("single:0", 0.6)
    assert plan.allows("single:1", 0.3) and not plan.allows("double:0", 0.1)
    assert not plan.allows("single:0", None) and not plan.allows("single:0", float("nan"))
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.1]
    # single:0 serves 1 of 5 steps, single:1 3 of 5, double:0 none: 4 of 15 layer-steps
    assert plan.share({"single:0": sigmas, "single:1": sigmas, "double:0": sigmas}) == pytest.approx(4 / 15)


def test_plan_json_round_trip_and_corrupt_fields_are_named(tmp_path):
    plan = ServingPlan.from_cells(EDGES, [("single:0", 0)], backend="ttr", fingerprint="abc", report={"x": 1})
    path = plan.save_json(tmp_path / "plan.json")
    again = ServingPlan.load_json(path)
    assert again.cells == plan.cells and again.edges == plan.edges and again.report == {"x": 1}
    for field, value, match in [("edges", [0.0, 1.0], "strictly decreasing"), ("cells", {"single:0": [7]}, "band"),
                                ("cells", {"single:0": [True]}, "band"), ("format", "other", "format"),
                                ("version", 99, "version"), ("fingerprint", 5, "fingerprint")]:
        data = plan.to_json()
        data[field] = value
        with pytest.raises(CheckpointError, match=match):
            ServingPlan.from_json(data, "test")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="bad.json: not valid JSON"):
        ServingPlan.load_json(tmp_path / "bad.json")


def test_writing_a_plan_keeps_every_other_component(tmp_path):
    path = tmp_path / "k.safetensors"
    save_checkpoint(path, {"backend.ttr": ({"w": torch.ones(3)}, {"a": 1}), "distiller.ttr": ({}, {"b": 2})})
    write_plan_into_checkpoint(path, ServingPlan.from_cells(EDGES, [("single:0", 1)]))
    comps = load_checkpoint(path)
    assert set(comps) == {"backend.ttr", "distiller.ttr", PLAN_COMPONENT}
    assert torch.equal(comps["backend.ttr"][0]["w"], torch.ones(3)) and comps["distiller.ttr"][1] == {"b": 2}


def test_fingerprint_changes_with_any_weight():
    a = {"x": torch.ones(4), "y": torch.zeros(2)}
    b = {"x": torch.ones(4), "y": torch.tensor([0.0, 1e-7])}
    assert fingerprint_tensors(a) == fingerprint_tensors(dict(a)) != fingerprint_tensors(b)


def test_fingerprint_reads_scalars_and_bf16():
    """A joint layer's state holds 0-dim tensors (its learned log-scale): calibrating it must not fail on them."""
    a = {"log_scale": torch.tensor(0.5), "w": torch.ones(3, dtype=torch.bfloat16)}
    b = {"log_scale": torch.tensor(0.25), "w": torch.ones(3, dtype=torch.bfloat16)}
    assert fingerprint_tensors(a) != fingerprint_tensors(b)


def _ttr_session(tmp_path, make_call, **controller):
    cfg = {"backend": "ttr", "exact": "sdpa", "plugins": {"controller": controller} if controller else {}}
    session = Session(cfg)
    q = torch.randn(1, 2, 24, 16)
    call = make_call("single:0", sigma=0.9, n_cond_tokens=8, n_image_tokens=16)
    session.attention(q, q, q, call)  # builds the layer
    session.run_end()
    return session, q, call


def _route(session, call):
    return session.router.decide(call)


def test_the_checkpoint_plan_is_served_by_default_and_survives_a_save(tmp_path, make_call):
    session, q, call = _ttr_session(tmp_path, make_call)
    backend = session.primary
    backend.ready["single:0"] = True
    assert _route(session, call).approximate  # no plan: readiness alone
    ckpt = session.save(tmp_path / "k.safetensors")
    fp = fingerprint_tensors(backend.state()[0])
    write_plan_into_checkpoint(ckpt, ServingPlan.from_cells(EDGES, [("single:0", 2)], backend="ttr", fingerprint=fp))

    served = Session({"backend": "ttr", "exact": "sdpa"})
    served.load(ckpt)
    served.primary.ready["single:0"] = True
    assert not _route(served, call).approximate  # σ 0.9 is band 0, not in the plan
    assert "not in the serving plan" in _route(served, call).reason
    assert _route(served, call.with_(sigma=0.1)).approximate
    assert "single:0" in plan_gate(served).describe() and any("serving plan" in n for n in served.serving_notes())
    # saving again (a distillation session re-saving its checkpoint) keeps the plan
    served.save(ckpt)
    assert PLAN_COMPONENT in load_checkpoint(ckpt)


def test_plan_off_and_plan_file_and_stale_fingerprint(tmp_path, make_call, caplog):
    session, q, call = _ttr_session(tmp_path, make_call, plan="off")
    session.primary.ready["single:0"] = True
    ckpt = session.save(tmp_path / "k.safetensors")
    write_plan_into_checkpoint(ckpt, ServingPlan.from_cells(EDGES, []))
    off = Session({"backend": "ttr", "exact": "sdpa", "plugins": {"controller": {"plan": "off"}}})
    off.load(ckpt)
    off.primary.ready["single:0"] = True
    assert _route(off, call).approximate  # the stored plan is ignored

    plan_file = ServingPlan.from_cells(EDGES, [("single:0", 0)], backend="ttr", fingerprint="0" * 32)
    plan_file.save_json(tmp_path / "plan.json")
    by_file = Session({"backend": "ttr", "exact": "sdpa",
                       "plugins": {"controller": {"plan": str(tmp_path / "plan.json")}}})
    by_file.load(ckpt)
    by_file.primary.ready["single:0"] = True
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        assert _route(by_file, call).approximate  # σ 0.9: band 0 is in the file's plan
    assert "calibrated for other weights" in caplog.text

    with pytest.raises(Exception, match="no plan file"):  # refused when the session is built, before any work
        Session({"backend": "ttr", "exact": "sdpa", "plugins": {"controller": {"plan": str(tmp_path / "no.json")}}})


def test_serving_without_a_plan_says_so_once_and_names_the_command(tmp_path, make_call, caplog):
    session, q, call = _ttr_session(tmp_path, make_call)
    session.primary.ready["single:0"] = True
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        for step in range(3):
            session.router.invalidate()
            _route(session, call.with_(step_index=step))
    assert caplog.text.count("has no serving plan") == 1 and "attnplug calibrate" in caplog.text
