"""A routing policy on a diffusers pipeline: trained through `PipelineEpisodes`, served by `apply(policy=...)`."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from attnplug.core import Session
from attnplug.hosts.diffusers import apply
from attnplug.hosts.diffusers import testing as tiny
from attnplug.hosts.diffusers.controller import train_pipeline_policy
from attnplug.plugins.controller.policy import RoutingPolicy
from attnplug.plugins.controller.policy_checkpoint import PolicyLayersError, load_policy, save_policy
from attnplug.plugins.controller.policy_gate import policy_gate

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_TTR = {"feature_dim": 16, "depth": 1, "hidden": 0, "key_chunk": 64, "query_chunk": 64}


def _ready_checkpoint(pipe, path):
    session = Session({"backend": "ttr", "exact": "host", "training": True, "distiller": "ttr",
                       "plugins": {"ttr": dict(TINY_TTR), "distill": {"readiness_min_updates": 1,
                                                                      "readiness_threshold": 1.0, "query_cap": 16}}})
    handle = apply(pipe, session)
    pipe("a cat", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    handle.remove()
    session.save(path)
    return sorted(k for k, r in session.primary.ready.items() if r)


def _config():
    return {"backend": "ttr", "exact": "host", "loggers": [], "plugins": {
        "ttr": dict(TINY_TTR),
        "controller": {"policy_training": {"episodes_per_update": 2, "pool": 2,
                                           "terms": [{"kind": "latent_rmse", "max": 0.5}]}}}}


def test_train_on_a_pipeline_then_serve_the_policy_with_its_knob(tmp_path):
    pipe = tiny.tiny_flux_pipeline()
    ckpt = tmp_path / "ttr.safetensors"
    ready = _ready_checkpoint(pipe, ckpt)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a cat", "a red house"]))
    out = tmp_path / "policy.safetensors"
    report = train_pipeline_policy(pipe, _config(), ckpt, policy_out=out, prompts_file=prompts, steps=2, device="cpu",
                                   height=64, width=64, updates=2, progress=False)
    assert report["updates"] == 2 and report["use_text"] and report["reference_runs"] == 2
    assert set(report["layers"]) == {"double:0", "double:1", "single:0", "single:1"}  # joint blocks too
    loaded = load_policy(out, layers=report["layers"])
    assert loaded.training.updates == 2 and loaded.training.baseline is not None

    session = Session(dict(_config(), checkpoint=str(ckpt)))
    handle = apply(pipe, session, policy=out, policy_threshold=0.0)  # threshold 0: every ready layer serves
    gate = policy_gate(session)
    assert gate.policy is not None and gate.threshold == 0.0
    pipe("a cat", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert gate.policy_calls == 2  # once per step
    served = {k for k, s in session.stats.items() if s.served.get("ttr")}
    assert served == set(ready)
    assert session.text_embedding is None or session.text_embedding.shape[-1] == loaded.policy.text_dim
    handle.remove()
    handle = apply(pipe, session, policy=out, policy_threshold=1.0)  # the other end: nothing serves
    before = {k: s.served.get("ttr", 0) for k, s in session.stats.items()}
    pipe("a cat", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert {k: s.served.get("ttr", 0) for k, s in session.stats.items()} == before
    handle.remove()
    session.close()


def test_apply_refuses_a_policy_for_other_layers(tmp_path):
    pipe = tiny.tiny_flux_pipeline()
    path = tmp_path / "other.safetensors"
    save_policy(path, RoutingPolicy(["single:0", "single:7"]))
    with pytest.raises(PolicyLayersError, match="other.safetensors"):
        apply(pipe, {"backend": "sdpa"}, policy=path)
    assert not hasattr(pipe, "_attnplug_tracker")  # nothing was patched
    with pytest.raises(ValueError, match="without a policy"):
        apply(pipe, {"backend": "sdpa"}, policy_threshold=0.3)
