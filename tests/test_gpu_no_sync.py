"""A served ttr call must not make the host wait for the GPU, and a whole forward with ttr serving can be captured.

A device sync inside `Session.attention` (a blocking copy of a CPU tensor to the GPU, `.item()`, `bool()` of a
device tensor) stops the CPU from queueing the next layer's work while the GPU runs this one, so every served
layer adds its Python time to the model's wall time (docs/PERFORMANCE.md). Under the default non-finite check
(`finite_check = "per_step"`: rows replaced on the device, flags read without waiting) a steady-state served call
— session, gates, fused kernels, landmarks, window, conditioner — has no sync at all, including the first call of a
new step; torch's sync debug mode turns any into an error. A CUDA-graph capture fails on any sync, so a whole Flux
forward with ttr serving captured and replayed shows the same. GPU only.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from attnplug.core import AttentionCall
from attnplug.core.session import Session

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("triton")),
                                reason="needs CUDA and Triton")

LAYERS = ["single:0", "single:1", "single:2"]


def _session(window: int, **root) -> Session:
    session = Session({"backend": "ttr", "exact": "sdpa", "loggers": [], "strict": True,
                       "gates": [{"kind": "layers", "include": ["single:*"]}],
                       "plugins": {"ttr": {"kernel": "triton"}, "landmark": {"window": window}}, **root})
    for key in LAYERS:
        session.backends.get("ttr").ready[key] = True  # type: ignore[attr-defined]
    return session


def _call(key: str, step: int, sigma: float) -> AttentionCall:
    return AttentionCall(layer_key=key, block_type="single", block_index=int(key.split(":")[1]), sigma=sigma,
                         cfg_scale=3.5, step_index=step, num_steps=4, n_cond_tokens=64, n_image_tokens=256,
                         latent_grid=(16, 16), host="test")


def _qkv(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(1, 4, 320, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))


def _two_steps_without_sync(session: Session, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: list[str],
                            call) -> list[torch.Tensor]:
    """Steps 1 and 2 (new σ: conditioner rows, the flag poll) of every layer in `keys` under sync debug mode
    "error": any device sync raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return [session.attention(q, k, v, call(key, step, sigma)) for step, sigma in ((1, 0.7), (2, 0.5))
                for key in keys]
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("window", [0, 2])
def test_served_calls_do_not_synchronize(window: int) -> None:
    """Three layers served for a step (builds layers, plans, kernels, conditioner rows), then two more steps under
    sync debug mode "error": new steps (new σ: conditioner rows, the flag poll) and every call, no sync."""
    session = _session(window)
    session.run_start(num_steps=4, host="test")
    q, k, v = _qkv()
    layers = session.backends.get("ttr").layers
    with torch.inference_mode():
        first = [session.attention(q, k, v, _call(key, 0, 0.9)) for key in LAYERS]
        for key in LAYERS:  # a distilled layer's running mean of d: adaptive α in one pass
            layers[key].set_d_reference(torch.full((4,), 0.1, device="cuda"))  # type: ignore[operator]
        warm = [session.attention(q, k, v, _call(key, 0, 0.9)) for key in LAYERS]
        outs = _two_steps_without_sync(session, q, k, v, LAYERS, _call)
    assert all(session.stats[key].served["ttr"] == 4 for key in LAYERS)
    assert all(bool(torch.isfinite(o).all()) for o in first + warm + outs)
    session.run_end()  # reads every flag (one sync, outside the calls)
    assert not any(session.stats[key].fallbacks for key in LAYERS)


@pytest.mark.parametrize("window", [0, 2])
def test_served_joint_calls_do_not_synchronize(window: int) -> None:
    """The joint layer's fused call (far-field key pass, joint query pass, SDPA text rows) on double blocks: after a
    warm-up step, two more steps under sync debug mode "error" — no sync, served fused, finite."""
    session = Session({"backend": "ttr", "exact": "sdpa", "loggers": [], "strict": True,
                       "gates": [{"kind": "layers", "include": ["double:*"]}],
                       "plugins": {"ttr": {"kernel": "triton", "joint_layers": ["double:*"]},
                                   "landmark": {"window": window}}})
    keys = ["double:0", "double:1"]
    ttr = session.backends.get("ttr")
    for key in keys:
        ttr.ready[key] = True  # type: ignore[attr-defined]

    def call(key: str, step: int, sigma: float) -> AttentionCall:
        return _call(key, step, sigma).with_(block_type="double")

    session.run_start(num_steps=4, host="test")
    q, k, v = _qkv()
    with torch.inference_mode():
        warm = [session.attention(q, k, v, call(key, 0, 0.9)) for key in keys]
        outs = _two_steps_without_sync(session, q, k, v, keys, call)
    assert all(bool(torch.isfinite(o).all()) for o in warm + outs)
    assert all(ttr.layers[key].serve_cache.entries for key in keys)  # type: ignore[attr-defined]
    session.run_end()
    assert not any(session.stats[key].fallbacks for key in keys)


def test_fused_call_with_python_numbers_does_not_synchronize() -> None:
    """Library use: α logit and branch affine given as Python numbers reach the GPU without a sync."""
    from attnplug.plugins.ttr.kernels import random_phi, ttr_forward_fused

    q, k, v = _qkv(seed=1)
    pq = random_phi(64, 64, 64, 2, generator=torch.Generator().manual_seed(0), device="cuda")
    idx = torch.arange(0, 320, 8, device="cuda")

    def call() -> torch.Tensor:
        return ttr_forward_fused(q, k, v, pq, pq, landmark_idx=idx, alpha_logit=-2.2,
                                 branch_affine=[0.1, 0.0, -0.1, 0.0], landmark_impl="fused", strict=True)
    first = call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(out.float(), first.float(), atol=2e-2)  # the key pass's atomics may reorder sums


def test_guard_on_the_gpu_keeps_an_overflowing_batch_element_finite() -> None:
    """The kernels' finite guard compiled for the GPU (bf16): a batch element whose kernel branch goes infinite comes
    back as its landmark rows, the other untouched, the flag raised — and no sync."""
    from attnplug.plugins.ttr.kernels import landmark_reference, random_phi, ttr_forward_fused

    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(2, 4, 320, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    pq = random_phi(64, 64, 64, 2, generator=torch.Generator().manual_seed(0), device="cuda")
    idx = torch.arange(0, 320, 8, device="cuda")
    aff = torch.tensor([[0.1, 0.0, -0.1, 0.0], [float("inf"), 0.0, -0.1, 0.0]], device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    kw = dict(landmark_idx=idx, alpha_logit=-1.0, adaptive=False, branch_affine=aff, landmark_impl="fused",
              strict=True)
    plain = ttr_forward_fused(q, k, v, pq, pq, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ttr_forward_fused(q, k, v, pq, pq, finite_flag=flag, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(flag) == 1 and bool(torch.isfinite(out).all()) and not bool(torch.isfinite(plain[1]).any())
    torch.testing.assert_close(out[0], plain[0])
    torch.testing.assert_close(out[1].float(), landmark_reference(q, k, v, idx)[1] * 0.9, atol=2e-2, rtol=2e-2)


def test_whole_flux_forward_with_ttr_is_captured_in_a_cuda_graph() -> None:
    """A FLUX-shaped transformer (the bench's smoke config) with ttr on its single blocks: after two eager forwards at
    one step, one forward is captured in a CUDA graph (which refuses any sync or host copy) and the replay gives the
    eager output."""
    pytest.importorskip("diffusers")
    from attnplug.bench import model as bm
    from attnplug.bench.variants import capture_graph
    from attnplug.hosts.diffusers import apply

    dev = torch.device("cuda")
    model = bm.build_transformer(bm.SMOKE, dev, torch.bfloat16)
    inputs = bm.make_inputs(bm.SMOKE, 256, 16, 1, dev, torch.bfloat16)
    session = Session(bm.mode_config("ttr-100", bm.SMOKE["num_single_layers"], "triton"))
    ttr = session.backends.get("ttr")
    for i in range(bm.SMOKE["num_single_layers"]):
        ttr.ready[f"single:{i}"] = True  # type: ignore[attr-defined]
    with apply(model, session), torch.inference_mode():
        session.run_start(num_steps=1, host="test")
        model(**inputs)
        for layer in ttr.layers.values():  # type: ignore[attr-defined]
            layer.set_d_reference(torch.full((layer.heads,), 0.1, device=dev))
        eager = model(**inputs)[0].float()
        replay = capture_graph(lambda: model(**inputs)[0], dev, warmup=1)
        out = replay().float()
        served = session.stats["single:0"].served["ttr"]
    assert served >= 3  # the eager forwards and the captured one served ttr
    assert ((out - eager).norm() / eager.norm()) < 1e-2  # the key pass's atomics may reorder sums
