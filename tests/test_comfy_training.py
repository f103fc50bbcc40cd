"""Training while sampling through the ComfyUI stand-in (distill node over several runs), then serving the
trained checkpoint (apply node). Needs the ttr backend and distiller; skipped with the reason otherwise."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference  # fixtures: the stand-in per module, inference_mode per test


# ---- training during sampling, apply from checkpoint (ttr + distiller) ------------------------------------------

def _need_distiller():
    from attnplug.hosts.comfy.configs import learned_backends, registered_distillers

    if "ttr" not in learned_backends() or "ttr" not in registered_distillers():
        pytest.skip("needs the ttr backend and the ttr distiller registered (plugins/ttr); "
                    "distiller not registered yet")


def test_distill_node_trains_over_several_runs_and_apply_serves_ready_layers(comfy, caplog):
    _need_distiller()
    import logging

    import comfy.utils
    from attnplug.core import load_checkpoint
    from attnplug.hosts.comfy import current_binding
    from attnplug.hosts.comfy.nodes import AttnplugApply, AttnplugDistill

    progress = []
    comfy.utils.PROGRESS_BAR_HOOK = lambda value, total, preview, node_id=None: progress.append((value, total))
    base = stub.tiny_model()
    ref = stub.sample(base, steps=3, cfg=1.0)
    cfg = {"backend": "ttr", "exact": "host", "loggers": [], "plugins": {"ttr": stub.TINY_TTR}}
    from attnplug.core import get_plugins

    if "distill" in get_plugins().config_sections():  # lenient readiness so the short run yields ready layers
        cfg["plugins"]["distill"] = {"readiness_min_updates": 1, "readiness_threshold": 1.0, "query_cap": 16}
    model = AttnplugDistill.execute(model=base, checkpoint="test_distill", distiller="ttr", mode="passthrough",
                                    config=cfg)[0]
    binding = current_binding(model)
    with caplog.at_level(logging.INFO, logger="attnplug"):
        for run in range(3):
            out = stub.sample(model, steps=3, cfg=1.0)
            if run == 0:  # no layer is ready during the first run: every call returns the teacher
                torch.testing.assert_close(out, ref)
            assert torch.isfinite(out).all()
    ckpt = Path(binding.handle.spec.checkpoint)
    assert ckpt.is_file() and binding.handle.saves == 3 and binding.handle.builds == 3
    comps = load_checkpoint(ckpt)
    assert "backend.ttr" in comps and any(c.startswith("distiller.") for c in comps)
    summaries = [r.getMessage() for r in caplog.records if " step " in r.getMessage() and "trained" in r.getMessage()]
    assert len(summaries) == 3 * 3  # one console summary per sampler step
    assert progress and progress[-1] == (3, 3)
    # the apply node ranks layers by the EMA cosine distance the distiller saved in the checkpoint
    from attnplug.core import Session
    from attnplug.hosts.comfy.configs import layer_scores

    probe = Session({"backend": "ttr", "exact": "host", "loggers": []})
    scores = layer_scores(probe, ckpt)
    probe.close()
    assert scores and set(scores) <= {"double:0", "double:1", "single:0", "single:1"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    # apply: quality_speed 0 → no learned layer serves → bit-identical to the exact image
    exact_model = AttnplugApply.execute(model=base, checkpoint="test_distill", quality_speed=0.0, config=cfg)[0]
    torch.testing.assert_close(stub.sample(exact_model, steps=3, cfg=1.0), ref, rtol=0, atol=0)
    # apply: every ready layer serves the trained student; finite, and different from the exact image
    if "distill" in cfg["plugins"]:
        fast = AttnplugApply.execute(model=base, checkpoint="test_distill", quality_speed=1.0, config=cfg)[0]
        out, served = stub.sample_served(fast, steps=3, cfg=1.0)
        assert torch.isfinite(out).all()
        assert any(v.get("ttr") for v in served.values()), served
    comfy.utils.PROGRESS_BAR_HOOK = None


