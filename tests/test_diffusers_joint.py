"""diffusers host end to end with the joint ttr layer on the double blocks of a tiny Flux: the host hands it the
text/image split and the latent grid, training inside `pipe(...)` calls reaches the joint layers, the checkpoint
reloads into a fresh pipeline, and the ready joint layers serve with their text-query rows exact."""
from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from attnplug.hosts.diffusers import apply
from attnplug.hosts.diffusers import testing as tiny
from attnplug.plugins.ttr.joint import JointLayer
from attnplug.plugins.ttr.layer import TtrLayer

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**root) -> dict:
    cfg = {"backend": "ttr", "exact": "host", "loggers": [],
           "plugins": {"ttr": {"feature_dim": 16, "depth": 1, "hidden": 0, "joint_layers": ["double:*"]},
                       # a 4 x 4 latent grid: few landmarks, so that the far field is not empty
                       "landmark": {"fraction": 0.0, "min": 2, "window": 1},
                       "distill": {"readiness_min_updates": 1, "readiness_threshold": 1.0, "query_cap": 24}}}
    cfg.update(root)
    return cfg


def _run(pipe, steps: int = 2):
    return pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=steps, max_sequence_length=32,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_joint_layers_train_reload_and_serve_through_the_diffusers_host(tmp_path, monkeypatch):
    calls: list = []
    forward = JointLayer.forward

    def spy(self, q, k, v, call, *args, **kwargs):
        bound = inspect.signature(forward).bind(self, q, k, v, call, *args, **kwargs).arguments
        calls.append((call, q.shape[2], k.shape[2], bound.get("query_index")))
        out = forward(self, q, k, v, call, *args, **kwargs)
        if bound.get("query_index") is None:
            n = call.n_cond_tokens
            text = torch.nn.functional.scaled_dot_product_attention(q[:, :, :n], k, v)
            assert torch.equal(out[:, :, :n], text.float()), "text-query rows must be exact SDPA"
        return out

    monkeypatch.setattr(JointLayer, "forward", spy)
    pipe = tiny.tiny_flux_pipeline(0)
    ref = _run(pipe)
    ckpt = tmp_path / "joint.safetensors"
    with apply(pipe, _config(training=True, distiller="ttr", mode="passthrough")) as handle:
        out = _run(pipe)
        assert (out == ref).all(), "passthrough training returns the teacher"
        learned = handle.session.learned_backends()["ttr"]
        assert {k for k, m in learned.layers.items() if isinstance(m, JointLayer)} == {"double:0", "double:1"}
        assert all(type(learned.layers[k]) is TtrLayer for k in ("single:0", "single:1"))
        assert all(learned.layers[k].calibrated for k in ("double:0", "double:1"))
        assert learned.ready.get("double:0") and learned.ready.get("double:1"), learned.ready
        handle.session.save(ckpt)
    assert calls, "the joint layers were never trained"
    call = calls[0][0]
    assert call.block_type == "double" and call.n_cond_tokens == 32 and call.latent_grid == (4, 4)
    assert call.n_image_tokens == 16 and calls[0][2] == 48

    calls.clear()
    fresh = tiny.tiny_flux_pipeline(0)
    with apply(fresh, _config(checkpoint=str(ckpt))) as handle:
        out = _run(fresh)
        served = {k: dict(s.served) for k, s in handle.session.stats.items()}
    assert served["double:0"].get("ttr", 0) > 0 and served["double:1"].get("ttr", 0) > 0, served
    assert [c for c in calls if c[3] is None], "served calls go through the joint layer with every query"
    assert out.shape == ref.shape and bool(torch.isfinite(torch.from_numpy(out)).all())
