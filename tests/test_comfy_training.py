"""Training while sampling through the ComfyUI stand-in (Distill over several runs), then serving the trained
checkpoint (Apply); training goes on when another pack sets its attention override after Distill. Needs the ttr
backend and distiller; skipped with the reason otherwise."""
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


def test_distill_node_trains_over_several_runs_and_apply_serves_ready_layers(comfy, caplog):
    stub.need_ttr_distiller()
    import comfy.utils
    from attnplug.core import Session, load_checkpoint
    from attnplug.hosts.comfy import current_binding
    from attnplug.hosts.comfy.nodes import NEW_CHECKPOINT, AttnplugApply, AttnplugDistill
    from attnplug.hosts.comfy.plans import layer_scores

    progress = []
    comfy.utils.PROGRESS_BAR_HOOK = lambda value, total, preview, node_id=None: progress.append((value, total))
    base = stub.tiny_model()
    ref = stub.sample(base, steps=3, cfg=1.0)
    cfg = stub.distill_config()
    model = AttnplugDistill.execute(model=base, checkpoint=NEW_CHECKPOINT, new_checkpoint="test_distill",
                                    distiller="ttr", mode="passthrough", config=cfg)[0]
    binding = current_binding(model)
    progress.clear()  # the reference run above reported too
    with caplog.at_level(logging.INFO, logger="attnplug"):
        for run in range(3):
            out = stub.sample(model, steps=3, cfg=1.0)
            if run == 0:  # no layer is ready during the first run: every call returns the teacher
                torch.testing.assert_close(out, ref)
            assert torch.isfinite(out).all()
    ckpt = Path(binding.handle.spec.checkpoint)
    assert ckpt.name == "test_distill.safetensors"
    assert ckpt.is_file() and binding.handle.saves == 3 and binding.handle.builds == 3
    comps = load_checkpoint(ckpt)
    assert "backend.ttr" in comps and any(c.startswith("distiller.") for c in comps)
    summaries = [r.getMessage() for r in caplog.records if " step " in r.getMessage() and "trained" in r.getMessage()]
    assert len(summaries) == 3 * 3  # one console summary per sampler step
    assert progress == [(1, 3), (2, 3), (3, 3)] * 3  # one progress message per step: the sampler's, not doubled
    # the apply node ranks layers by the EMA cosine distance the distiller saved in the checkpoint
    probe = Session({"backend": "ttr", "exact": "host", "loggers": []})
    scores = layer_scores(probe, ckpt)
    probe.close()
    assert scores and set(scores) <= {"double:0", "double:1", "single:0", "single:1"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    # apply: quality_speed 0 → no learned layer serves → bit-identical to the exact image
    exact_model = AttnplugApply.execute(model=base, checkpoint="test_distill.safetensors", quality_speed=0.0,
                                        config=cfg)[0]
    torch.testing.assert_close(stub.sample(exact_model, steps=3, cfg=1.0), ref, rtol=0, atol=0)
    # apply: every ready layer serves the trained student; finite, and different from the exact image
    fast = AttnplugApply.execute(model=base, checkpoint="test_distill.safetensors", quality_speed=1.0, config=cfg)[0]
    out, served = stub.sample_served(fast, steps=3, cfg=1.0)
    assert torch.isfinite(out).all()
    assert any(v.get("ttr") for v in served.values()), served
    comfy.utils.PROGRESS_BAR_HOOK = None


def test_distill_keeps_training_under_an_override_set_after_it(comfy, caplog):
    """Another pack's attention override placed after Distill (which replaces attnplug's in the model's options)
    becomes attnplug's exact path: training goes on, and the checkpoint holds that training."""
    stub.need_ttr_distiller()
    from attnplug.core import load_checkpoint
    from attnplug.hosts.comfy import current_binding
    from attnplug.hosts.comfy.nodes import NEW_CHECKPOINT, AttnplugDistill

    base = stub.tiny_model()
    ref = stub.sample(base, steps=2, cfg=1.0)
    model = AttnplugDistill.execute(model=base, checkpoint=NEW_CHECKPOINT, new_checkpoint="after_other_pack",
                                    distiller="ttr", mode="passthrough", config=stub.distill_config())[0]
    calls = []

    def sage_like(func, q, k, v, heads, **kwargs):  # its own kernel; ignores `func`
        calls.append(1)
        return func(q, k, v, heads, **kwargs)

    after = model.clone()
    after.model_options["transformer_options"]["optimized_attention_override"] = sage_like
    binding = current_binding(after)
    with caplog.at_level(logging.INFO, logger="attnplug"):
        out = stub.sample(after, steps=2, cfg=1.0)
    torch.testing.assert_close(out, ref)  # passthrough: the image is the other pack's exact attention
    assert len(calls) == 2 * 4  # every call's teacher came from the other pack
    ckpt = Path(binding.handle.spec.checkpoint)
    assert binding.handle.saves == 1 and ckpt.is_file()
    meta = next(m for c, (_, m) in load_checkpoint(ckpt).items() if c.startswith("distiller."))
    assert meta["total_updates"] > 0  # it trained, and what it saved is that training
    assert any("sage_like after attnplug; attnplug wraps it" in r.getMessage() for r in caplog.records)
