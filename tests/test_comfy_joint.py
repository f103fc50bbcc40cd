"""The joint ttr layer through the ComfyUI stand-in: the distill node trains the double blocks as joint layers
with the text/image split and the latent grid from `transformer_options`, and the apply node serves them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference  # fixtures: the stand-in per module, inference_mode per test


def test_distill_and_apply_nodes_train_and_serve_joint_layers(comfy, monkeypatch):
    from attnplug.hosts.comfy import current_binding
    from attnplug.hosts.comfy.nodes import AttnplugApply, AttnplugDistill
    from attnplug.plugins.ttr.joint import JointLayer

    seen = []
    forward = JointLayer.forward

    def spy(self, q, k, v, call, *args, **kwargs):
        seen.append(call)
        return forward(self, q, k, v, call, *args, **kwargs)

    monkeypatch.setattr(JointLayer, "forward", spy)
    cfg = {"backend": "ttr", "exact": "host", "loggers": [],
           "plugins": {"ttr": {**stub.TINY_TTR, "joint_layers": ["double:*"]},
                       "landmark": {"fraction": 0.0, "min": 2, "window": 1},  # a 4 x 4 grid: keep a far field
                       "distill": {"readiness_min_updates": 1, "readiness_threshold": 1.0, "query_cap": 12}}}
    model = AttnplugDistill.execute(model=stub.tiny_model(), checkpoint="test_joint", distiller="ttr",
                                    mode="passthrough", config=cfg)[0]
    binding = current_binding(model)
    for _ in range(2):
        assert torch.isfinite(stub.sample(model, steps=3, cfg=1.0, txt=5, hw=8)).all()
    assert seen and all(c.block_type == "double" for c in seen)
    assert {(c.n_cond_tokens, c.n_image_tokens, c.latent_grid) for c in seen} == {(5, 16, (4, 4))}
    assert Path(binding.handle.spec.checkpoint).is_file()

    seen.clear()
    applied = AttnplugApply.execute(model=stub.tiny_model(), checkpoint="test_joint", quality_speed=1.0, config=cfg)[0]
    out, served = stub.sample_served(applied, steps=2, cfg=1.0, txt=5, hw=8)
    assert torch.isfinite(out).all()
    assert served["double:0"].get("ttr", 0) > 0 and served["double:1"].get("ttr", 0) > 0, served
    assert seen, "the served double blocks ran the joint layer"
