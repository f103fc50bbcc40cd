"""diffusers host: apply/remove, bit-identity with the host backend, teacher via the dispatcher, SD3 order.

Tiny random-initialised components built offline (attnplug.hosts.diffusers.testing).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from attnplug.core import Session
from attnplug.hosts.diffusers import LayerProcessor, apply
from attnplug.hosts.diffusers import testing as tiny
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

HOST = {"backend": "host", "exact": "host", "loggers": []}
SDPA = {"backend": "sdpa", "exact": "sdpa", "loggers": []}


# one torch thread: two-thread OpenMP on a shared 2-core box makes these tiny models 40× slower
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny.tiny_flux_pipeline(0)


@pytest.fixture(scope="module")
def flux2_pipe():
    return tiny.tiny_flux2_pipeline(0)


def _flux(pipe, **kw):
    args = dict(
        prompt="a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=3,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    args.update(kw)
    return pipe(**args).images


def _flux2(pipe, **kw):
    args = dict(
        prompt_embeds=torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1)),
        height=64,
        width=64,
        num_inference_steps=3,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    args.update(kw)
    return pipe(**args).images


def _processors(model):
    return {name: proc for name, proc in model.attn_processors.items()}


def test_flux_host_backend_is_bit_identical_and_remove_restores_identity(flux_pipe):
    before = _processors(flux_pipe.transformer)
    ref = _flux(flux_pipe)
    handle = apply(flux_pipe, HOST)
    patched = _processors(flux_pipe.transformer)
    assert all(isinstance(p, LayerProcessor) for p in patched.values())
    assert set(handle.layers) == {"double:0", "double:1", "single:0", "single:1"}
    out = _flux(flux_pipe)
    assert (out == ref).all(), "host backend must reproduce the unpatched pipeline bit for bit"
    summary = handle.session.summary()["layers"]
    assert {k: v["served"] for k, v in summary.items()} == {k: {"host": 3} for k in handle.layers}
    handle.remove()
    after = _processors(flux_pipe.transformer)
    assert all(after[k] is before[k] for k in before), (
        "remove() must put back the very same processor objects"
    )
    assert type(flux_pipe).__name__ == "FluxPipeline" and "_attnplug_base" not in type(flux_pipe).__dict__
    assert "forward" not in flux_pipe.transformer.__dict__
    assert (_flux(flux_pipe) == ref).all()


def test_flux2_host_backend_is_bit_identical(flux2_pipe):
    ref = _flux2(flux2_pipe)
    with apply(flux2_pipe, HOST) as handle:
        assert set(handle.layers) == {"double:0", "double:1", "single:0", "single:1"}
        out = _flux2(flux2_pipe)
        served = {k: v["served"] for k, v in handle.session.summary()["layers"].items()}
    assert (out == ref).all()
    assert served == {k: {"host": 3} for k in served} and len(served) == 4
    assert handle.removed and handle.session.closed  # the context manager closed the session apply built
    assert not any(isinstance(p, LayerProcessor) for p in flux2_pipe.transformer.attn_processors.values())


def test_remove_leaves_no_references(flux_pipe):
    session = Session(HOST)
    handle = apply(flux_pipe, session)
    _flux(flux_pipe, num_inference_steps=2)
    wrappers = [weakref.ref(p) for p in flux_pipe.transformer.attn_processors.values()]
    handle.remove()
    session_ref = weakref.ref(session)
    del session, handle
    gc.collect()
    assert session_ref() is None, "something still holds the session after remove()"
    assert all(w() is None for w in wrappers), "a wrapper processor survived remove()"


def test_removed_pipeline_can_be_collected_while_the_handle_lives():
    pipe = tiny.tiny_flux2_pipeline(0)
    handle = apply(pipe, HOST)
    _flux2(pipe, num_inference_steps=1)
    handle.remove()
    pipe_ref, model_ref = weakref.ref(pipe), weakref.ref(pipe.transformer)
    del pipe
    gc.collect()
    assert pipe_ref() is None and model_ref() is None
    assert handle.removed


def test_apply_twice_is_refused(flux2_pipe):
    with apply(flux2_pipe, HOST), pytest.raises(ValueError, match="already applied"):
        apply(flux2_pipe.transformer, HOST)


def test_apply_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        apply(object(), HOST)


def test_set_attention_backend_still_selects_the_teacher_kernel():
    """After apply, `set_attention_backend` reaches the original processors; the host path uses it."""
    model = tiny.tiny_flux2_transformer(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16),
        encoder_hidden_states=torch.randn(1, 8, 32),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(1, 16, 4),
        txt_ids=torch.zeros(1, 8, 4),
        guidance=torch.tensor([4.0]),
    )
    name = AttentionBackendName._NATIVE_MATH
    original_fn, active = _AttentionBackendRegistry._backends[name], _AttentionBackendRegistry._active_backend
    hits = []

    def spy(*args, **kwargs):
        hits.append(kwargs["query"].shape)
        return original_fn(*args, **kwargs)

    _AttentionBackendRegistry._backends[name] = spy
    try:
        with apply(model, HOST) as handle:
            model.set_attention_backend("_native_math")
            originals = [
                m.processor._attnplug_original for m in model.modules() if hasattr(m, "set_processor")
            ]
            assert all(p._attention_backend == name for p in originals)
            with torch.no_grad():
                model(**inputs)
            assert len(hits) == 4 and all(s == (1, 24, 2, 16) for s in hits)  # [B, N, H, D] at the dispatcher
            assert handle.session.summary()["layers"]["single:1"]["served"] == {"host": 1}
    finally:
        _AttentionBackendRegistry._backends[name] = original_fn
        _AttentionBackendRegistry._active_backend = active


def test_qwenimage_generic_wrapper_is_bit_identical_and_passes_the_mask():
    model = tiny.tiny_qwenimage_transformer(0)
    keep = torch.ones(1, 7, dtype=torch.bool)
    keep[0, 5:] = False
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16),
        encoder_hidden_states=torch.randn(1, 7, 32),
        encoder_hidden_states_mask=keep,
        timestep=torch.tensor([0.7]),
        img_shapes=[(1, 4, 4)],
    )
    with torch.no_grad():
        ref = model(**inputs).sample
    session = Session(HOST)
    seen = []
    inner = session.attention

    def record(q, k, v, call, mask=None, host_attention=None):
        seen.append((call, tuple(q.shape), mask))
        return inner(q, k, v, call, mask, host_attention)

    session.attention = record
    with apply(model, session) as handle, torch.no_grad():
        out = model(**inputs).sample
    assert torch.equal(out, ref)
    assert set(handle.layers) == {"double:0", "double:1"}
    call, shape, mask = seen[0]
    assert shape == (1, 2, 23, 16) and call.n_cond_tokens == 7 and call.n_image_tokens == 16
    assert call.latent_grid == (4, 4) and call.sigma == pytest.approx(0.7)
    assert mask is not None and mask.shape[-1] == 23 and not bool(mask[..., 5:7].any())


def test_sd3_joint_processor_is_intercepted_text_first():
    model = tiny.tiny_sd3_transformer(0, dual_attention_layers=(0,))
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 8),
        encoder_hidden_states=torch.randn(1, 5, 32),
        pooled_projections=torch.randn(1, 32),
        timestep=torch.tensor([700.0]),
    )
    with torch.no_grad():
        ref = model(**inputs).sample
    with apply(model, HOST) as handle, torch.no_grad():
        assert set(handle.layers) == {"double:0", "double:0.attn2", "double:1"}
        out = model(**inputs).sample
    assert torch.equal(out, ref), "host backend on SD3 must be bit-identical"

    session = Session(SDPA)
    seen = []
    inner = session.attention

    def record(q, k, v, call, mask=None, host_attention=None):
        seen.append((call, q.clone()))
        return inner(q, k, v, call, mask, host_attention)

    session.attention = record
    host_q = []
    with apply(model, session) as handle, torch.no_grad():
        state = model.transformer_blocks[1].attn.processor._attnplug_state
        real_sdpa = state.host_sdpa

        def spy_sdpa(q, *a, **kw):
            host_q.append(q.clone())
            return real_sdpa(q, *a, **kw)

        state.host_sdpa = spy_sdpa
        out_sdpa = model(**inputs).sample
        state.host_sdpa = real_sdpa
        # the session's exact sdpa (not the host) served: check the token order with a host call
        call, q = [s for s in seen if s[0].layer_key == "double:1"][0]
        assert call.n_cond_tokens == 5 and call.n_image_tokens == 16 and call.latent_grid == (4, 4)
        assert call.sigma == pytest.approx(0.7)
    torch.testing.assert_close(out_sdpa, ref, rtol=1e-5, atol=1e-5)
    assert host_q == []  # exact = sdpa: the host SDPA was not used
    attn2 = [s[0] for s in seen if s[0].layer_key == "double:0.attn2"][0]
    assert attn2.n_cond_tokens == 0 and attn2.n_image_tokens == 16

    # [text, image] for attnplug: the host gets the original [image, text] sequence back
    other_session = Session(HOST)
    got = []
    inner2 = other_session.attention

    def record2(q, k, v, call, mask=None, host_attention=None):
        got.append(q.clone())
        return inner2(q, k, v, call, mask, host_attention)

    other_session.attention = record2
    with apply(model, other_session), torch.no_grad():
        state = model.transformer_blocks[1].attn.processor._attnplug_state
        real_sdpa = state.host_sdpa
        state.host_sdpa = lambda q, *a, **kw: (host_q.append(q.clone()), real_sdpa(q, *a, **kw))[1]
        model(**inputs)
    q_attnplug, q_host = got[-1], host_q[-1]
    assert torch.equal(q_host, torch.cat([q_attnplug[:, :, 5:], q_attnplug[:, :, :5]], dim=2))
