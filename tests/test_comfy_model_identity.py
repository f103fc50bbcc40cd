"""Which model a checkpoint was distilled on, through the ComfyUI stand-in: the distill node records the bound
model's fingerprints, the apply node serves them on that model and withholds them (exact, said once) on another."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference  # fixtures: the stand-in per module, inference_mode per test

CFG = {"backend": "ttr", "exact": "host", "loggers": [], "plugins": {
    "ttr": stub.TINY_TTR, "landmark": {"fraction": 0.0, "min": 2, "window": 0},
    "distill": {"readiness_min_updates": 1, "readiness_threshold": 1.0, "query_cap": 12}}}


def test_the_apply_node_withholds_layers_distilled_on_another_model(comfy, caplog):
    from attnplug.core import load_checkpoint, model_identity
    from attnplug.hosts.comfy import current_binding
    from attnplug.hosts.comfy.nodes import AttnplugApply, AttnplugDistill
    from attnplug.hosts.comfy.plans import model_fingerprints

    model = AttnplugDistill.execute(model=stub.tiny_model(seed=0), checkpoint="test_identity", distiller="ttr",
                                    mode="passthrough", config=CFG)[0]
    for _ in range(2):
        stub.sample(model, steps=3, cfg=1.0)
    path = current_binding(model).handle.spec.checkpoint
    recorded, _ = load_checkpoint(path)[model_identity.COMPONENT]
    own = model_fingerprints(stub.tiny_model(seed=0))
    assert sorted(recorded) == sorted(own) and all(torch.equal(recorded[k], own[k]) for k in own)

    same = AttnplugApply.execute(model=stub.tiny_model(seed=0), checkpoint="test_identity", quality_speed=1.0,
                                 config=CFG)[0]
    _, served = stub.sample_served(same, steps=2, cfg=1.0)
    assert any(s.get("ttr", 0) > 0 for s in served.values()), served

    with caplog.at_level(logging.WARNING, logger="attnplug"):
        other = AttnplugApply.execute(model=stub.tiny_model(seed=3), checkpoint="test_identity", quality_speed=1.0,
                                      config=CFG)[0]
        _, served = stub.sample_served(other, steps=2, cfg=1.0)
    assert not any(s.get("ttr", 0) for s in served.values()), served
    assert caplog.text.count("were distilled on another model") == 1 and "serving them exact" in caplog.text
