"""The Calibrate node against the ComfyUI stand-in: it samples the same noise exact and per cell through one
kept session, stores the plan it found in the checkpoint, and Apply then reports and serves that plan."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference


def _calibration_config(max_rmse: float) -> dict:
    cfg = stub.ttr_config()
    cfg.setdefault("plugins", {})["controller"] = {"calibration": {
        "prompts": 2, "sigma_bands": [1.0, 0.5, 0.0], "terms": [{"kind": "latent_rmse", "max": max_rmse}]}}
    return cfg


def test_calibrate_node_stores_a_plan_that_apply_serves(comfy, caplog):
    from attnplug.core import load_checkpoint
    from attnplug.hosts.comfy.files import model_folders
    from attnplug.hosts.comfy.nodes import AttnplugApply, AttnplugCalibrate
    from attnplug.plugins.controller.plan import PLAN_COMPONENT, ServingPlan

    path = model_folders()[0] / "calibrate.safetensors"
    stub.ttr_checkpoint(path, ready={"single:0", "single:1"})
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    report = AttnplugCalibrate.execute(model=stub.tiny_model(), checkpoint=path.name, positive=pos, negative=neg,
                                       latent=latent, seed=3, steps=4, cfg=2.0, sampler_name="euler",
                                       scheduler="simple", config=_calibration_config(1e9))[0]
    assert "served 100.0 % of layer-steps" not in report  # double blocks are not ready: never served
    plan = ServingPlan.from_json(load_checkpoint(path)[PLAN_COMPONENT][1], "test")
    assert {layer for layer, _ in plan.cell_list()} == {"single:0", "single:1"}
    assert len(plan.cell_list()) == 4 and "single:0" in report

    with caplog.at_level(logging.INFO, logger="attnplug"):
        model = AttnplugApply.execute(model=stub.tiny_model(), checkpoint=path.name, quality_speed=1.0,
                                      config=stub.ttr_config())[0]
        _, served = stub.sample_served(model, steps=4)
    assert "serving plan from checkpoint" in caplog.text
    assert {k for k, v in served.items() if v.get("ttr")} == {"single:0", "single:1"}


def test_a_tight_budget_serves_nothing_and_the_checkpoint_keeps_its_layers(comfy):
    from attnplug.core import load_checkpoint
    from attnplug.hosts.comfy.files import model_folders
    from attnplug.hosts.comfy.nodes import AttnplugCalibrate
    from attnplug.plugins.controller.plan import PLAN_COMPONENT, ServingPlan

    path = model_folders()[0] / "tight.safetensors"
    stub.ttr_checkpoint(path, ready={"single:0"})
    before = load_checkpoint(path)["backend.ttr"][0]
    pos = torch.randn(1, 5, 16)
    AttnplugCalibrate.execute(model=stub.tiny_model(), checkpoint=path.name, positive=pos, negative=pos,
                              latent={"samples": torch.zeros(1, 4, 8, 8)}, seed=0, steps=3, cfg=1.0,
                              sampler_name="euler", scheduler="simple", config=_calibration_config(1e-9))
    after = load_checkpoint(path)
    assert ServingPlan.from_json(after[PLAN_COMPONENT][1], "test").cells == {}
    assert all(torch.equal(before[k], after["backend.ttr"][0][k]) for k in before)
    with pytest.raises(ValueError, match="no checkpoint chosen"):
        AttnplugCalibrate.execute(model=stub.tiny_model(), checkpoint="", positive=pos, negative=pos,
                                  latent={"samples": torch.zeros(1, 4, 8, 8)}, seed=0, steps=3, cfg=1.0,
                                  sampler_name="euler", scheduler="simple")
