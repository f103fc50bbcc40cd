"""`attnplug calibrate` on a diffusers pipeline: fixed prompts and noise, the plan stored in the checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from attnplug.core import Session, load_checkpoint
from attnplug.hosts.diffusers import apply
from attnplug.hosts.diffusers import testing as tiny
from attnplug.hosts.diffusers.calibration import PipelineSampler, calibrate_pipeline, read_prompts
from attnplug.plugins.controller.plan import PLAN_COMPONENT, ServingPlan

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_TTR = {"feature_dim": 16, "depth": 1, "hidden": 0, "key_chunk": 64, "query_chunk": 64}
CALL = dict(height=64, width=64, steps=3)


def _ready_checkpoint(pipe, path):
    """Distil briefly with lenient readiness: every layer trained and ready."""
    session = Session({"backend": "ttr", "exact": "host", "training": True, "distiller": "ttr",
                       "plugins": {"ttr": dict(TINY_TTR), "distill": {"readiness_min_updates": 1,
                                                                      "readiness_threshold": 1.0, "query_cap": 16}}})
    handle = apply(pipe, session)
    for seed in range(2):
        pipe("a cat", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(seed))
    handle.remove()
    session.save(path)
    ready = sorted(k for k, r in session.primary.ready.items() if r)
    assert ready, "the brief distillation made no layer ready"
    return ready


def _config(max_rmse):
    return {"backend": "ttr", "exact": "host", "plugins": {
        "ttr": dict(TINY_TTR),
        "controller": {"calibration": {"prompts": 2, "sigma_bands": [1.0, 0.5, 0.0],
                                       "terms": [{"kind": "latent_rmse", "max": max_rmse},
                                                 {"kind": "image_rmse", "max": 10.0}]}}}}


def test_pipeline_sampler_is_deterministic_and_records_what_terms_need():
    pipe = tiny.tiny_flux_pipeline()
    session = Session({"backend": "sdpa", "exact": "host"})
    sampler = PipelineSampler(pipe, session, ["a cat", "a dog"], seed=3, steps=3, height=64, width=64)
    a, b = sampler.sample(), sampler.sample()
    sampler.close()
    assert a.latent.shape[0] == 2 and a.image.shape[:2] == (2, 3) and a.image.min() >= -1 and a.image.max() <= 1
    assert len(a.velocities) == 3 and a.prompts == ["a cat", "a dog"]
    assert torch.equal(a.latent, b.latent) and torch.equal(a.image, b.image)


def test_calibrate_pipeline_stores_a_plan_within_budget(tmp_path):
    pipe = tiny.tiny_flux_pipeline()
    ckpt = tmp_path / "ttr.safetensors"
    layers = _ready_checkpoint(pipe, ckpt)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a cat", "a red house", "a tree"]))
    report = calibrate_pipeline(pipe, _config(1e9), ckpt, out=tmp_path / "out", prompts_file=prompts,
                                device="cpu", height=64, width=64, steps=3, progress=False)
    plan = ServingPlan.from_json(load_checkpoint(ckpt)[PLAN_COMPONENT][1], "test")
    assert {layer for layer, _ in plan.cell_list()} == set(layers)  # an unlimited budget serves everything
    assert report["share_served"] == pytest.approx(1.0) and report["prompts"] == 2
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"calibration.json", "calibration.txt", "calibration.png"}

    strict = calibrate_pipeline(pipe, _config(1e-9), ckpt, out=tmp_path / "out2", prompts_file=prompts,
                                device="cpu", height=64, width=64, steps=3, progress=False, write_checkpoint=False,
                                plan_out=tmp_path / "plan.json")
    assert strict["share_served"] == 0.0 and ServingPlan.load_json(tmp_path / "plan.json").cells == {}
    assert ServingPlan.from_json(load_checkpoint(ckpt)[PLAN_COMPONENT][1], "test").cells == plan.cells  # untouched


def test_prompt_files_are_checked(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(["ok", ""]))
    with pytest.raises(ValueError, match="entry 1 must be a non-empty string"):
        read_prompts(bad)
    bad.write_text("{}")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        read_prompts(bad)
