"""The Train Policy node and the Apply node's policy inputs against the ComfyUI stand-in."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference


def _config() -> dict:
    cfg = stub.ttr_config()
    cfg["plugins"]["controller"] = {"policy_training": {"episodes_per_update": 1, "pool": 2,
                                                        "terms": [{"kind": "latent_rmse", "max": 0.5}]}}
    return cfg


def _train(path_name: str, **kw):
    from attnplug.hosts.comfy.nodes import AttnplugTrainPolicy

    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    args = dict(model=stub.tiny_model(), checkpoint=path_name, positive=pos, negative=neg,
                latent={"samples": torch.zeros(1, 4, 8, 8)}, seed=3, steps=3, cfg=2.0, sampler_name="euler",
                scheduler="simple", minutes=0.0, updates=2, policy_name="policy.safetensors", config=_config())
    args.update(kw)
    return AttnplugTrainPolicy.execute(**args)[0]


def test_train_policy_node_writes_a_policy_that_apply_serves_by_its_threshold(comfy):
    from attnplug.hosts.comfy.files import model_folders
    from attnplug.hosts.comfy.nodes import AttnplugApply
    from attnplug.plugins.controller.policy_checkpoint import load_policy

    folder = model_folders()[0]
    stub.ttr_checkpoint(folder / "routed.safetensors", ready={"single:0", "single:1"})
    report = _train("routed.safetensors")
    assert "2 updates" in report and "text features (16 wide)" in report  # the context tokens, pooled
    loaded = load_policy(folder / "policy.safetensors")
    assert set(loaded.policy.layers) == {"double:0", "double:1", "single:0", "single:1"}
    assert loaded.training.updates == 2
    assert "4 updates" in _train("routed.safetensors")  # resumed from the file

    def served(threshold):
        model = AttnplugApply.execute(model=stub.tiny_model(), checkpoint="routed.safetensors", quality_speed=1.0,
                                      config=stub.ttr_config(), policy="policy.safetensors",
                                      policy_threshold=threshold)[0]
        _, by_layer = stub.sample_served(model, steps=3)
        return {k for k, v in by_layer.items() if v.get("ttr")}

    assert served(0.0) == {"single:0", "single:1"}  # every ready layer, never the unready double blocks
    assert served(1.0) == set()


def test_a_policy_for_another_model_is_refused_before_sampling(comfy):
    from attnplug.core.config import ConfigError
    from attnplug.hosts.comfy.files import model_folders
    from attnplug.hosts.comfy.nodes import AttnplugApply
    from attnplug.plugins.controller.policy import RoutingPolicy
    from attnplug.plugins.controller.policy_checkpoint import save_policy

    folder = model_folders()[0]
    stub.ttr_checkpoint(folder / "other_model.safetensors", ready={"single:0"})
    save_policy(folder / "wrong.safetensors", RoutingPolicy(["single:0", "single:9"]))
    with pytest.raises(ConfigError, match="wrong.safetensors.*another layer set"):
        AttnplugApply.execute(model=stub.tiny_model(), checkpoint="other_model.safetensors", quality_speed=1.0,
                              config=stub.ttr_config(), policy="wrong.safetensors", policy_threshold=0.5)
    with pytest.raises(ValueError, match="set minutes or updates"):
        _train("other_model.safetensors", updates=0)
