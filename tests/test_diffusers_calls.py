"""diffusers host: the AttentionCall each layer reports, steps and runs, and host passthrough."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from attnplug.core import Session
from attnplug.hosts.diffusers import apply, layer_identity
from attnplug.hosts.diffusers import testing as tiny
from attnplug.hosts.diffusers.layout import layout_for
from attnplug.hosts.diffusers.processors import LayerState, make_dispatch
from attnplug.hosts.diffusers.tracking import StepState, grid_from_ids

HOST = {"backend": "host", "exact": "host", "loggers": []}


# one torch thread: two-thread OpenMP on a shared 2-core box makes these tiny models 40× slower
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny.tiny_flux_pipeline(0)


def _recording_session(config=HOST):
    session = Session(config)
    seen = []
    inner = session.attention

    def record(q, k, v, call, mask=None, host_attention=None):
        out = inner(q, k, v, call, mask, host_attention)
        run = session.run  # after the call: the session opens a run by itself when none is open
        seen.append((call, tuple(q.shape), None if run is None else (run.index, run.num_steps)))
        return out

    session.attention = record
    return session, seen


def test_flux_true_cfg_calls(flux_pipe):
    session, seen = _recording_session()
    with apply(flux_pipe, session):
        flux_pipe(
            prompt="a photo of a cat",
            negative_prompt="a dog",
            true_cfg_scale=2.0,
            guidance_scale=3.5,
            height=64,
            width=64,
            num_inference_steps=3,
            max_sequence_length=32,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
        assert session.run is None and session.runs_done == 1  # the run ended with the pipeline call
        sigmas = [float(s) for s in flux_pipe.scheduler.sigmas[:-1]]
    assert len(seen) == 3 * 2 * 4  # steps × (cond, uncond) × layers
    for i, (call, shape, run) in enumerate(seen):
        step, rest = divmod(i, 8)
        assert call.step_index == step and call.num_steps == 3 and run == (0, 3)
        assert call.sigma == pytest.approx(sigmas[step], abs=1e-6)
        assert call.cond is (rest < 4)  # the pipeline's cache_context("cond") then ("uncond")
        assert call.cfg_scale == 2.0  # true CFG scale, not the distilled guidance
        assert call.n_cond_tokens == 32 and call.n_image_tokens == 16 and call.latent_grid == (4, 4)
        assert shape == (1, 2, 48, 16) and call.host == "diffusers"
    keys = [c.layer_key for c, _, _ in seen[:4]]
    assert keys == ["double:0", "double:1", "single:0", "single:1"]
    assert [(c.block_type, c.block_index) for c, _, _ in seen[:4]] == [
        ("double", 0),
        ("double", 1),
        ("single", 0),
        ("single", 1),
    ]


def test_each_pipeline_call_is_one_run_with_its_step_count(flux_pipe):
    session, seen = _recording_session()
    with apply(flux_pipe, session):
        for steps in (2, 3):
            flux_pipe(
                prompt="a cat",
                guidance_scale=3.5,
                height=64,
                width=64,
                num_inference_steps=steps,
                max_sequence_length=32,
                output_type="latent",
            )
        assert session.runs_done == 2 and session.run is None
    assert [r for _, _, r in seen] == [(0, 2)] * 8 + [(1, 3)] * 12
    assert [c.step_index for c, _, _ in seen[::4]] == [0, 1, 0, 1, 2]
    assert all(c.cond is True and c.cfg_scale == 3.5 for c, _, _ in seen)  # distilled guidance, no negative


def test_run_ends_when_the_pipeline_raises(flux_pipe):
    session, _ = _recording_session()

    def boom(pipe, i, t, kwargs):
        raise RuntimeError("interrupted by the user")

    with apply(flux_pipe, session) as handle:
        with pytest.raises(RuntimeError, match="interrupted"):
            flux_pipe(
                prompt="a cat",
                height=64,
                width=64,
                num_inference_steps=3,
                max_sequence_length=32,
                output_type="latent",
                callback_on_step_end=boom,
            )
        assert session.run is None and session.runs_done == 1
        assert handle._tracker.state.pipe_depth == 0


def test_bare_transformer_counts_steps_from_the_timestep():
    model = tiny.tiny_flux2_transformer(0)
    session, seen = _recording_session()
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16),
        encoder_hidden_states=torch.randn(1, 8, 32),
        img_ids=torch.cartesian_prod(torch.arange(1), torch.arange(2), torch.arange(8), torch.arange(1))[
            None
        ],
        txt_ids=torch.zeros(1, 8, 4),
        guidance=torch.tensor([4.0]),
    )
    with apply(model, session) as handle, torch.no_grad():
        for t in (1.0, 1.0, 0.75, 0.5, 1.0, 0.6):  # two runs; the second call of a step repeats its timestep
            model(timestep=torch.tensor([t]), **inputs)
        assert session.runs_done == 1 and session.run is not None
        handle.end_run()
        assert session.runs_done == 2 and session.run is None
    per_forward = [c for c, _, _ in seen[::4]]
    assert [c.step_index for c in per_forward] == [0, 0, 1, 2, 0, 1]
    assert [c.sigma for c in per_forward] == pytest.approx([1.0, 1.0, 0.75, 0.5, 1.0, 0.6])
    assert [r[0] for _, _, r in seen[::4]] == [0, 0, 0, 0, 1, 1]
    assert all(c.num_steps is None and c.cond is None and c.cfg_scale == 4.0 for c in per_forward)
    assert all(
        c.latent_grid == (2, 8) and c.n_cond_tokens == 8 and c.n_image_tokens == 16 for c, _, _ in seen
    )


def test_calls_the_session_cannot_serve_go_to_the_host_and_are_counted():
    session = Session(HOST)
    host_calls = []

    def host(q, k, v, attn_mask=None, **kw):
        host_calls.append((q.shape, k.shape, kw))
        return torch.zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3])

    state = LayerState(
        session,
        StepState(),
        layout_for(tiny.tiny_flux2_transformer(0)),
        "transformer_blocks.0.attn",
        "double:0",
        "double",
        0,
        host,
        None,
    )
    dispatch = make_dispatch(state)
    q, kv = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8)
    dispatch(q, kv, kv)  # cross-attention: 4 queries, 6 keys
    dispatch(kv, kv, kv, is_causal=True)
    dispatch(kv, kv, kv, scale=0.5)
    state.n_txt_arg, state.n_img_arg = 2, 3  # processor saw 2 + 3 tokens, dispatcher 6: does not add up
    dispatch(kv, kv, kv)
    assert len(host_calls) == 4 and host_calls[1][2]["is_causal"] is True and host_calls[2][2]["scale"] == 0.5
    reasons = dict(state.passthrough)
    assert len(reasons) == 4 and any("cross-attention" in r for r in reasons)
    assert any("causal" in r for r in reasons) and any("scale" in r for r in reasons)
    assert any("2 text + 3 image" in r for r in reasons)
    assert session.stats == {}  # none of these reached the session

    state.n_txt_arg, state.n_img_arg = 2, 4
    out = dispatch(kv, kv, kv, backend="native")
    assert out.shape == (1, 6, 2, 8) and host_calls[-1][2]["backend"] == "native"
    assert session.stats["double:0"].served["host"] == 1


def test_grid_from_flux_and_flux2_ids():
    flux = torch.zeros(6, 8, 3)
    flux[..., 1] += torch.arange(6)[:, None]
    flux[..., 2] += torch.arange(8)[None, :]
    flux = flux.reshape(48, 3)
    assert grid_from_ids(flux) == (6, 8)
    ref = flux[:12].clone()
    ref[:, 0] = 1  # a Kontext reference image: another first coordinate
    assert grid_from_ids(torch.cat([flux, ref])) == (6, 8)
    flux2 = torch.cartesian_prod(torch.arange(1), torch.arange(3), torch.arange(5), torch.arange(1))
    assert grid_from_ids(flux2[None].expand(2, -1, -1)) == (3, 5)
    assert grid_from_ids(flux2[:-1]) is None  # not a full rectangle: no guess


@pytest.mark.parametrize(
    "path, expected",
    [
        ("transformer_blocks.3.attn", ("double:3", "double", 3)),
        ("single_transformer_blocks.12.attn", ("single:12", "single", 12)),
        ("transformer_blocks.0.attn2", ("double:0.attn2", "double", 0)),
        ("blocks.4.self_attn", ("blocks.4.self_attn", "other", 4)),
        ("attn", ("attn", "other", -1)),
    ],
)
def test_layer_identity(path, expected):
    assert layer_identity(path) == expected


def _flux_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def test_grid_cache_never_serves_a_freed_or_rewritten_ids_tensor():
    """The latent grid is cached per img_ids tensor; a new tensor at a freed one's address (same
    shape, version 0) or an in-place rewrite must not get the old grid back."""
    from attnplug.hosts.diffusers.tracking import Tracker

    tracker = Tracker.__new__(Tracker)  # only the grid cache is exercised
    tracker._grid_cache, tracker._patch = None, 1
    buf = bytearray(_flux_ids(6, 8).numpy().tobytes())
    a = torch.frombuffer(buf, dtype=torch.float32).view(48, 3)
    assert tracker._grid({"img_ids": a}) == (6, 8)
    buf[:] = _flux_ids(8, 6).numpy().tobytes()  # same memory, another grid
    flat = torch.frombuffer(buf, dtype=torch.float32)
    del a
    b = flat.view(48, 3)  # the next object: CPython usually hands it the freed one's id
    assert tracker._grid({"img_ids": b}) == (8, 6)
    b.copy_(_flux_ids(4, 12))  # in place: the version changes
    assert tracker._grid({"img_ids": b}) == (4, 12)
    assert tracker._grid({"img_ids": b}) == (4, 12)  # and the cache serves it again
