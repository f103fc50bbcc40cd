"""diffusers host end to end with the learned `ttr` backend: training inside `pipe(...)` calls, checkpoint
save, reload into a fresh pipeline, serving. Skipped, with the reason, while plugins/ttr registers no `ttr`
backend or no `ttr` distiller."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from attnplug.core import Session, get_plugins, load_checkpoint
from attnplug.hosts.diffusers import apply
from attnplug.hosts.diffusers import testing as tiny

TINY_TTR = {"feature_dim": 16, "depth": 1, "hidden": 0, "key_chunk": 64, "query_chunk": 64}
LAYERS = {"double:0", "double:1", "single:0", "single:1"}


# one torch thread: two-thread OpenMP on a shared 2-core box makes these tiny models 40× slower
pytestmark = pytest.mark.usefixtures("one_thread")


def _need_ttr() -> None:
    pm = get_plugins()
    if "ttr" not in pm.collect("backend").names():
        pytest.skip("attnplug.plugins.ttr registers no 'ttr' backend")
    if "ttr" not in pm.collect("distiller").names():
        pytest.skip("attnplug.plugins.ttr registers no 'ttr' distiller (attnplug_register_distillers) yet")


def _config(**root) -> dict:
    cfg = {"backend": "ttr", "exact": "host", "loggers": [], "plugins": {"ttr": dict(TINY_TTR)}}
    if "distill" in get_plugins().config_sections():  # lenient readiness: a short run yields ready layers
        cfg["plugins"]["distill"] = {"readiness_min_updates": 1, "readiness_threshold": 1.0, "query_cap": 16}
    cfg.update(root)
    return cfg


def _run(pipe, steps: int = 3):
    return pipe(
        prompt="a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=steps,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_training_happens_inside_pipeline_calls_and_the_checkpoint_reloads(tmp_path):
    _need_ttr()
    pipe = tiny.tiny_flux_pipeline(0)
    ref = _run(pipe)
    ckpt = tmp_path / "ttr.safetensors"

    with apply(pipe, _config(training=True, distiller="ttr", mode="passthrough")) as handle:
        session = handle.session
        out = _run(pipe)
        assert (out == ref).all(), "passthrough training must return the teacher (host) output"
        trained = {k: s.trained for k, s in session.stats.items()}
        assert set(trained) == LAYERS and sum(trained.values()) > 0, trained
        assert session.runs_done == 1 and session.run is None
        _run(pipe)
        assert session.runs_done == 2
        learned = session.learned_backends()["ttr"]
        assert set(learned.layers) <= LAYERS and learned.layers
        weights = {
            k: {n: p.detach().clone() for n, p in m.state_dict().items()} for k, m in learned.layers.items()
        }
        ready = {k for k, r in learned.ready.items() if r}
        if "distill" in get_plugins().config_sections():
            assert ready, "with readiness_threshold=1.0 and min_updates=1 two runs must make layers ready"
        session.save(ckpt)
    comps = load_checkpoint(ckpt)
    assert "backend.ttr" in comps and any(c.startswith("distiller.") for c in comps)

    fresh = tiny.tiny_flux_pipeline(0)
    with apply(fresh, _config(checkpoint=str(ckpt))) as handle:
        reloaded = handle.session.learned_backends()["ttr"]
        assert set(reloaded.layers) == set(weights)
        for key, tensors in weights.items():
            for name, value in reloaded.layers[key].state_dict().items():
                torch.testing.assert_close(value, tensors[name], msg=f"{key}.{name} differs after reload")
        assert {k for k, r in reloaded.ready.items() if r} == ready
        out = _run(fresh)
        served = {k: s.served for k, s in handle.session.stats.items()}
    assert out.shape == ref.shape and bool(torch.isfinite(torch.from_numpy(out)).all())
    for key in LAYERS:
        assert served[key].get("ttr", 0) > 0 if key in ready else served[key].get("host", 0) > 0, (
            key,
            served,
        )


def test_ttr_without_training_serves_nothing_until_layers_are_ready():
    _need_ttr()
    pipe = tiny.tiny_flux2_pipeline(0)
    session = Session(_config())
    with apply(pipe, session):
        pipe(
            prompt_embeds=torch.randn(1, 16, 32),
            height=64,
            width=64,
            num_inference_steps=2,
            output_type="latent",
        )
    served = {k: dict(s.served) for k, s in session.stats.items()}
    assert served == {k: {"host": 2} for k in LAYERS}  # fail-closed: untrained layers run exact
