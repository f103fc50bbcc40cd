"""ComfyUI binding against the stand-in (tests/comfy_stub): override layouts, other packs' overrides before and
after attnplug, callbacks and cleanup, AttentionCall fields, older builds, memory reservation, entry point.
All under inference_mode."""
from __future__ import annotations

import gc
import importlib.util
import logging
import sys
import weakref
from pathlib import Path

import pytest
import torch

from attnplug.core.exact import sdpa

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference  # fixtures: the stand-in per module, inference_mode per test


def _spec(**root):
    from attnplug.hosts.comfy import SessionSpec

    return SessionSpec({"backend": "host", "exact": "host", "loggers": [], **root})


class Recorder:
    """Wraps the binding's session.attention to record every AttentionCall it gets."""

    def __init__(self, binding):
        self.calls = []
        orig = binding.handle.ensure

        def ensure():
            s = orig()
            if not getattr(s, "_recorded", False):
                inner = s.attention

                def attention(q, k, v, call, mask=None, host_attention=None):
                    self.calls.append((call, tuple(q.shape)))
                    return inner(q, k, v, call, mask, host_attention)

                s.attention = attention
                s._recorded = True
            return s

        binding.handle.ensure = ensure


# ---- layouts --------------------------------------------------------------------------------------

def _override_call(binding, q, k, v, heads, **kw):
    from comfy.ldm.modules.attention import attention_pytorch

    to = {"optimized_attention_override": binding.override, "block_type": "single", "block_index": 0,
          "img_slice": [3, q.shape[2] if kw.get("skip_reshape") else q.shape[1]],
          "sigmas": torch.tensor([0.5]), "cond_or_uncond": [0]}
    return attention_pytorch(q, k, v, heads, transformer_options=to, **kw)


@pytest.mark.parametrize("skip_reshape, skip_output_reshape", [(True, False), (False, False), (True, True),
                                                               (False, True)])
def test_override_handles_every_layout(comfy, skip_reshape, skip_output_reshape):
    from attnplug.hosts.comfy.binding import AttnplugBinding

    b, h, n, d = 2, 3, 11, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    ref = sdpa(q, k, v)
    binding = AttnplugBinding(_spec(exact="sdpa"), None)
    rec = Recorder(binding)
    args = (q, k, v) if skip_reshape else tuple(t.transpose(1, 2).reshape(b, n, h * d) for t in (q, k, v))
    out = _override_call(binding, *args, h, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    if skip_output_reshape:
        assert out.shape == (b, h, n, d)
        torch.testing.assert_close(out, ref)
    else:
        assert out.shape == (b, n, h * d)
        torch.testing.assert_close(out, ref.transpose(1, 2).reshape(b, n, h * d))
    assert rec.calls and rec.calls[0][1] == (b, h, n, d)  # the session always sees [B, H, N, D]


def test_flux_call_path_matches_unbound_model(comfy):
    from attnplug.hosts.comfy import bind

    import comfy.ldm.modules.attention as attn

    base = stub.tiny_model()
    ref = stub.sample(base)
    bound = bind(base, _spec())
    attn.KERNEL_CALLS.clear()
    out = stub.sample(bound)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # exact = host: ComfyUI's own kernel, bit for bit
    # Flux's call: [B, H, N, D] in (skip_reshape); attnplug asks the host kernel for [B, H, N, D] back
    assert attn.KERNEL_CALLS and set(attn.KERNEL_CALLS) == {("pytorch", True, True)}
    assert "optimized_attention_override" not in base.model_options["transformer_options"]  # clone did not leak


# ---- chaining --------------------------------------------------------------------------------------

def test_prior_override_is_kept_and_called_for_the_exact_path(comfy):
    from attnplug.hosts.comfy import bind, current_binding

    seen = []

    def other_pack(func, q, k, v, heads, **kwargs):
        seen.append((kwargs.get("skip_reshape"), kwargs.get("skip_output_reshape", False),
                     kwargs.get("_inside_attn_wrapper")))
        return func(q, k, v, heads, **kwargs) * 1.0  # e.g. a different kernel

    base = stub.tiny_model()
    other = base.clone()
    other.model_options["transformer_options"]["optimized_attention_override"] = other_pack
    ref = stub.sample(other)
    n_alone = len(seen)
    seen.clear()
    bound = bind(other, _spec())
    out = stub.sample(bound)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert len(seen) == n_alone > 0  # every exact call went through the other pack, none recursed
    assert all(flag is True for _, _, flag in seen)
    assert current_binding(bound).prior is other_pack
    # binding attnplug twice replaces the first binding and keeps the foreign override
    again = bind(bound, _spec())
    assert current_binding(again).prior is other_pack
    from comfy.patcher_extension import CallbacksMP

    assert len(again.get_callbacks(CallbacksMP.ON_PRE_RUN, "attnplug")) == 1
    assert len(again.model_options["transformer_options"]["patches"]["attn1_patch"]) == 1


def _other_pack(model, seen, chain=False):
    """What a pack like KJNodes' Sage attention does: clone the model and set its own override (replacing one
    already there); `chain=True` calls the override it replaced instead of the kernel."""
    m = model.clone()
    to = m.model_options["transformer_options"]
    replaced = to.get("optimized_attention_override")

    def other_pack(func, q, k, v, heads, **kwargs):
        seen.append(kwargs.get("_inside_attn_wrapper"))
        if chain and replaced is not None:
            return replaced(func, q, k, v, heads, **kwargs)
        return func(q, k, v, heads, **kwargs)

    to["optimized_attention_override"] = other_pack
    return m, other_pack


def test_an_override_set_after_attnplug_becomes_its_exact_path(comfy, caplog):
    from attnplug.hosts.comfy import bind, current_binding

    base = stub.tiny_model()
    ref = stub.sample(base)
    bound = bind(base, _spec())
    seen = []
    after, other_pack = _other_pack(bound, seen)
    binding = current_binding(after)  # found by its callbacks although the override is the other pack's
    assert binding is current_binding(bound)
    rec = Recorder(binding)
    with caplog.at_level(logging.INFO, logger="attnplug"):
        out = stub.sample(after)
        stub.sample(after)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert len(rec.calls) == 2 * 4 * 4 and len(seen) == len(rec.calls)  # attnplug saw every call, then the pack
    assert all(flag is True for flag in seen)
    logs = [r.getMessage() for r in caplog.records if "other_pack" in r.getMessage()]
    assert len(logs) == 1 and "after attnplug; attnplug wraps it and uses it as its exact path" in logs[0]
    # only the run's copy of the options changed: the model still holds the other pack's override
    assert after.model_options["transformer_options"]["optimized_attention_override"] is other_pack
    assert binding.run_prior is None


def test_a_pack_that_chains_to_the_override_it_replaced_does_not_recurse(comfy):
    from attnplug.hosts.comfy import bind, current_binding

    base = stub.tiny_model()
    ref = stub.sample(base)
    below = []
    under, under_pack = _other_pack(base, below)  # a pack before attnplug
    bound = bind(under, _spec())
    seen = []
    after, _ = _other_pack(bound, seen, chain=True)  # a pack after attnplug that calls attnplug's override
    rec = Recorder(current_binding(after))
    torch.testing.assert_close(stub.sample(after), ref, rtol=0, atol=0)
    # each call: attnplug → the pack after it → attnplug again (passed down) → the pack before attnplug
    assert len(rec.calls) == 4 * 4 and len(seen) == len(below) == len(rec.calls)
    assert current_binding(after).prior is under_pack
    # binding attnplug again keeps the pack that was set after the earlier binding as the exact path
    again = bind(after, _spec())
    assert current_binding(again).prior is after.model_options["transformer_options"]["optimized_attention_override"]
    assert current_binding(again) is not current_binding(after)


def test_prior_override_ignoring_skip_output_reshape_is_normalized(comfy):
    from attnplug.hosts.comfy import bind

    def sloppy(func, q, k, v, heads, **kwargs):
        kwargs = dict(kwargs, skip_output_reshape=False)  # always [B, N, H*D], like some third-party kernels
        return func(q, k, v, heads, **kwargs)

    base = stub.tiny_model()
    ref = stub.sample(base)
    other = base.clone()
    other.model_options["transformer_options"]["optimized_attention_override"] = sloppy
    torch.testing.assert_close(stub.sample(bind(other, _spec())), ref)


# ---- callbacks, cleanup, memory ---------------------------------------------------------------------

def test_callbacks_fire_and_cleanup_releases_the_session(comfy):
    from attnplug.hosts.comfy import bind, current_binding
    from comfy.patcher_extension import CallbacksMP

    bound = bind(stub.tiny_model(), _spec())
    binding = current_binding(bound)
    assert bound.get_callbacks(CallbacksMP.ON_PRE_RUN, "attnplug") == [binding.on_pre_run]
    assert bound.get_callbacks(CallbacksMP.ON_CLEANUP, "attnplug") == [binding.on_cleanup]
    refs = []
    orig_pre = binding.on_pre_run

    def pre(p):
        orig_pre(p)
        refs.append(weakref.ref(binding.handle.session))

    bound.callbacks[CallbacksMP.ON_PRE_RUN]["attnplug"] = [pre]
    for _ in range(3):
        stub.sample(bound)
        assert binding.handle.session is None  # cleaned up after every run
    gc.collect()
    assert len(refs) == 3 and all(r() is None for r in refs)  # no session survives its run
    assert binding.handle.builds == 3
    assert binding.state.sigmas_obj is None and binding.state.capture is None


def test_cached_output_rebuilds_session_from_checkpoint(comfy, tmp_path):
    """A session cleaned up after its run is rebuilt (with its checkpoint) when the cached model runs again."""
    from attnplug.hosts.comfy import bind, current_binding

    bound = bind(stub.tiny_model(), _spec())
    binding = current_binding(bound)
    stub.sample(bound)
    assert binding.handle.session is None
    # the override is called outside a sampler run (no pre-run): it rebuilds lazily instead of failing
    from comfy.ldm.modules.attention import attention_pytorch

    q = torch.randn(1, 2, 9, 16)
    to = bound.model_options["transformer_options"] | {"block_type": "single", "block_index": 1, "img_slice": [4, 9]}
    out = attention_pytorch(q, q, q, 2, skip_reshape=True, transformer_options=to)
    assert out.shape == (1, 9, 32) and binding.handle.session is not None and binding.handle.builds == 2


def test_memory_reservation_off_by_default_and_sized_by_estimate(comfy):
    from attnplug.hosts.comfy import SessionSpec, bind

    import comfy.model_management as mm

    mm.FREE_MEMORY_CALLS.clear()
    stub.sample(bind(stub.tiny_model(), _spec()))
    assert mm.FREE_MEMORY_CALLS == []
    spec = SessionSpec({"backend": "sdpa", "exact": "sdpa", "loggers": []}, memory_reserve=True)
    stub.sample(bind(stub.tiny_model(), spec))
    # sdpa's estimate: B*H*Nq*Nk*4 bytes; B=2 (cond+uncond), H=2, N=5+16 tokens; reserved once at its maximum
    need = int(2 * 2 * 21 * 21 * 4 * 1.1)
    assert mm.FREE_MEMORY_CALLS == [(need, torch.device("cpu"))]


# ---- AttentionCall ---------------------------------------------------------------------------------

def test_attention_call_fields_come_from_transformer_options(comfy):
    from attnplug.hosts.comfy import bind, current_binding

    bound = bind(stub.tiny_model(), _spec())
    rec = Recorder(current_binding(bound))
    stub.sample(bound, steps=4, cfg=3.5, txt=7, hw=8)
    calls = [c for c, _ in rec.calls]
    assert {c.layer_key for c in calls} == {"double:0", "double:1", "single:0", "single:1"}
    assert all(c.n_cond_tokens == 7 and c.n_image_tokens == 16 for c in calls)  # 8x8 latent, 2x2 patches
    assert all(c.latent_grid == (4, 4) and c.cfg_scale == 3.5 and c.host == "comfy" for c in calls)
    assert all(c.cond is None for c in calls)  # cond and uncond batched together
    assert [c.step_index for c in calls] == [i for i in range(4) for _ in range(4)]
    assert [round(c.sigma, 4) for c in calls[::4]] == [1.0, 0.75, 0.5, 0.25]
    assert all(c.num_steps == 4 for c in calls)
    assert {(c.block_type, c.block_index) for c in calls} == {("double", 0), ("double", 1), ("single", 0),
                                                               ("single", 1)}


def test_cfg_one_is_a_cond_only_batch(comfy):
    from attnplug.hosts.comfy import bind, current_binding

    bound = bind(stub.tiny_model(), _spec())
    rec = Recorder(current_binding(bound))
    stub.sample(bound, steps=2, cfg=1.0)
    assert rec.calls and all(c.cond is True and c.cfg_scale == 1.0 for c, _ in rec.calls)


def test_builds_without_img_slice_use_the_captured_context_length(comfy, monkeypatch):
    from attnplug.hosts.comfy import bind, current_binding

    import comfy.ldm.flux.layers as layers

    monkeypatch.setattr(layers, "IMG_SLICE", False)
    bound = bind(stub.tiny_model(), _spec())
    rec = Recorder(current_binding(bound))
    stub.sample(bound, steps=2, txt=6)
    assert rec.calls and all(c.n_cond_tokens == 6 and c.n_image_tokens == 16 for c, _ in rec.calls)


def test_double_block_split_comes_from_the_attn1_patch(comfy):
    """With a context length that differs from the real split, double blocks still use img_slice."""
    from attnplug.hosts.comfy import bind, current_binding

    bound = bind(stub.tiny_model(), _spec())
    binding = current_binding(bound)
    rec = Recorder(binding)
    orig = binding.diffusion_model_wrapper

    def lying_wrapper(executor, x, timestep, context, *a, **kw):
        out = orig(lambda *args, **kws: None, x, timestep, context, *a, **kw)  # record...
        binding.state.context_len = 1  # ...then poison the fallback
        return executor(x, timestep, context, *a, **kw) if out is None else out

    from comfy.patcher_extension import WrappersMP

    bound.wrappers[WrappersMP.DIFFUSION_MODEL]["attnplug"] = [lying_wrapper]
    stub.sample(bound, steps=1, txt=5)
    assert rec.calls and all(c.n_cond_tokens == 5 for c, _ in rec.calls)


def test_older_build_without_block_info_warns_once_and_runs_exact(comfy, monkeypatch, caplog):
    from attnplug.hosts.comfy import bind, current_binding

    import comfy.ldm.flux.model as flux_model

    monkeypatch.setattr(flux_model, "BLOCK_INFO", False)
    base = stub.tiny_model()
    ref = stub.sample(base)
    bound = bind(base, _spec(backend="sdpa", exact="sdpa"))
    binding = current_binding(bound)
    rec = Recorder(binding)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        out = stub.sample(bound)
        stub.sample(bound)
    warnings = [r for r in caplog.records if "block_type/block_index" in r.getMessage()]
    assert len(warnings) == 1
    assert rec.calls == []  # never reaches the session: nothing is keyed "single:0" by guess
    assert binding.exact_calls == 2 * 4 * 4
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ---- entry point -------------------------------------------------------------------------------------

def test_entrypoint_loads_like_comfyui_under_a_folder_name(comfy):
    """As nodes.load_custom_node: import the folder's __init__ under its path-derived name, call comfy_entrypoint."""
    import asyncio

    import attnplug
    from comfy_api.latest import ComfyExtension

    root = Path(attnplug.__file__).parent
    name = str(root / "custom_nodes" / "ComfyUI-attnplug").replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # else ComfyUI would never call comfy_entrypoint
        ext = module.comfy_entrypoint()
        assert isinstance(ext, ComfyExtension)
        asyncio.run(ext.on_load())
        nodes = asyncio.run(ext.get_node_list())
        ids = [n.GET_SCHEMA().node_id for n in nodes]
        assert len(ids) == len(set(ids)) == len(stub.all_nodes()) == 11
        assert sys.modules[name] is sys.modules["attnplug"]  # one package, one registry
    finally:
        sys.modules.pop(name, None)


def test_call_keeps_the_latent_grid_when_reference_tokens_follow(caplog):
    """Kontext-style edits append reference-image tokens: the call keeps the generated latent's grid, so the
    landmark plugin's window plan reports the mismatch (not "the host did not report a grid")."""
    import torch

    from attnplug.hosts.comfy.calls import CallBuilder, CallState
    from attnplug.plugins.landmark.backend import LandmarkBackend

    st = CallState()
    st.latent_grid = (4, 4)
    to = {"block_type": "single", "block_index": 0, "img_slice": [7, 7 + 16 + 16]}  # 16 target + 16 reference
    call = CallBuilder(st).build(to, 7 + 32)
    assert call.latent_grid == (4, 4) and call.n_cond_tokens == 7 and call.n_image_tokens == 32
    k = torch.zeros(1, 1, 39, 4)
    with caplog.at_level("WARNING", logger="attnplug"):
        assert LandmarkBackend().window_plan(k, k, call) == (0, None)
    assert [r.getMessage() for r in caplog.records if "32 image tokens but its latent grid (4, 4) holds 16"
            in r.getMessage()]
