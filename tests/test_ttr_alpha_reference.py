"""Adaptive α against a running reference of d (`[plugins.ttr] alpha_reference = "running"`).

What a user relies on: training keeps a per-head running mean of the branch disagreement d and saves it;
serving with "running" normalises d by it (the call's own mean with "call", or while no running mean exists);
the fused kernels then blend in one pass (MODE 4) and agree with the PyTorch path; checkpoints written before
the reference existed still load (and serve with the call's mean).

CPU: Triton's interpreter at small sizes; GPU (skipped without CUDA): a Flux 1024² shape in bf16.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import HAS_CUDA, HAS_TRITON, interpreted  # noqa: E402

from attnplug.core import AttentionCall, LayerSpec
from attnplug.core.checkpoint import load_checkpoint, save_checkpoint
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.landmark.selection import select_landmarks
from attnplug.plugins.landmark.settings import LandmarkSettings
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.kernels import KernelConfig, random_phi, ttr_forward_fused, ttr_forward_reference
from attnplug.plugins.ttr.layer import REFERENCE_MOMENTUM
from attnplug.plugins.ttr.settings import TtrSettings

N_COND, GRID, HEADS, DIM = 5, (6, 6), 2, 16
SMALL_TILES = KernelConfig(lm_block_m=16, lm_warps=2, lm_stages=1, lm_block=16, lm_window_block=16, q_block_m=16,
                           q_warps=2, q_stages=1, sdpa_memory_fraction=0.5, sdpa_min_rows=8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "output has non-finite (unwritten) elements"
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _qkv(b: int, n: int, dtype=torch.float32, device="cpu", seed=0, heads=HEADS, dim=DIM):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _call(step: int = 0) -> AttentionCall:
    return AttentionCall("single:0", n_cond_tokens=N_COND, n_image_tokens=GRID[0] * GRID[1], latent_grid=GRID,
                         sigma=0.6, cfg_scale=3.0, step_index=step, host="test")


def _backend(reference: str, kernel: str = "torch", window: int = 2) -> TtrBackend:
    lm = LandmarkBackend(LandmarkSettings(fraction=0.1, min=3, window=window))
    return TtrBackend(TtrSettings(kernel=kernel, feature_dim=16, hidden=32, alpha_max=0.9,
                                  alpha_reference=reference), landmark=lm.branch)


def _call_mean_of_d(layer, q, k, v, backend) -> torch.Tensor:
    """The per-head mean of d of one call, as the layer computes it (PyTorch path)."""
    seen = {}
    real = layer.alpha

    def spy(out_k, out_l, track_reference=False):
        d = 1.0 - torch.nn.functional.cosine_similarity(out_k, out_l, dim=-1, eps=1e-8)
        seen["mean"] = d.mean(dim=-1).mean(dim=0)
        return real(out_k, out_l, track_reference)

    layer.alpha = spy
    try:
        backend.train_forward("single:0", q, k, v, _call())
    finally:
        del layer.alpha
    return seen["mean"]


# ---- the layer: training keeps the reference, serving uses it ------------------------------------------------
def test_training_keeps_a_running_mean_of_d_and_serving_uses_it():
    backend = _backend("running")
    layer = backend.layer(LayerSpec("single:0", HEADS, DIM), torch.device("cpu"))
    q, k, v = _qkv(2, N_COND + 36, seed=1)
    assert not layer.reference_tracked and layer.running_reference() is None
    with torch.inference_mode():
        before = backend.forward(q, k, v, _call())  # no reference yet: the call's own mean, as "call"
    first = _call_mean_of_d(layer, q, k, v, backend)  # also a training forward: the first mean is taken as is
    torch.testing.assert_close(layer.d_reference, first)
    assert layer.reference_tracked and layer.running_reference() is layer.d_reference
    q2, k2, v2 = _qkv(2, N_COND + 36, seed=2)
    second = _call_mean_of_d(layer, q2, k2, v2, backend)
    torch.testing.assert_close(layer.d_reference, (first + second) / 2)  # the first calls: their plain average
    assert not torch.allclose(first, second)  # the step is visible: the check above can fail
    for _ in range(int(1 / REFERENCE_MOMENTUM)):  # later calls: an EMA with weight REFERENCE_MOMENTUM
        layer._track_reference(second.view(1, HEADS, 1))
    before_last = layer.d_reference.clone()
    layer._track_reference(first.view(1, HEADS, 1))
    torch.testing.assert_close(layer.d_reference, before_last + REFERENCE_MOMENTUM * (first - before_last))
    # serving with the running mean differs from serving with the call's mean; "call" ignores the reference
    other = _backend("call")
    other.layer(LayerSpec("single:0", HEADS, DIM), torch.device("cpu")).load_state_dict(layer.state_dict())
    layer.set_d_reference(torch.full((HEADS,), 0.05 * float(first.detach().min())))  # far below: α near its top
    with torch.inference_mode():
        running = backend.forward(q, k, v, _call())
        by_call = other.forward(q, k, v, _call())
    torch.testing.assert_close(by_call, before, atol=1e-6, rtol=1e-6)
    assert _rel(running, by_call) > 1e-2


def test_a_non_finite_training_call_leaves_the_reference_unchanged():
    backend = _backend("running")
    layer = backend.layer(LayerSpec("single:0", HEADS, DIM), torch.device("cpu"))
    layer.set_d_reference(torch.tensor([0.2, 0.3]))  # a set (or loaded) reference counts as settled: EMA steps
    layer._track_reference(torch.tensor([[[float("nan")], [0.5]]]))  # [B=1, H=2, 1]
    torch.testing.assert_close(layer.d_reference, torch.tensor([0.2, 0.3 + REFERENCE_MOMENTUM * 0.2]))
    with pytest.raises(ValueError, match="expected 2 values"):
        layer.set_d_reference(torch.ones(3))


# ---- checkpoints ---------------------------------------------------------------------------------------------
def test_reference_is_saved_and_older_checkpoints_still_load(tmp_path: Path):
    backend = _backend("running")
    layer = backend.layer(LayerSpec("single:0", HEADS, DIM), torch.device("cpu"))
    layer.set_d_reference(torch.tensor([0.25, 0.5]))
    path = tmp_path / "ttr.safetensors"
    save_checkpoint(path, {"backend.ttr": backend.state()})
    loaded = _backend("running")
    loaded.load_state(*load_checkpoint(path)["backend.ttr"])
    got = loaded.layers["single:0"]
    torch.testing.assert_close(got.d_reference, torch.tensor([0.25, 0.5]))
    assert got.running_reference() is not None
    # a file from before the reference existed: no `d_reference` tensor; it loads and serves with the call's mean
    tensors, meta = backend.state()
    assert meta["version"] == 2
    tensors = {n: t for n, t in tensors.items() if not n.endswith("/d_reference")}
    meta = {**meta, "version": 1}  # a file without running means of d
    old = tmp_path / "old.safetensors"
    save_checkpoint(old, {"backend.ttr": (tensors, meta)})
    loaded = _backend("running")
    loaded.load_state(*load_checkpoint(old)["backend.ttr"])
    got = loaded.layers["single:0"]
    assert not got.reference_tracked and got.running_reference() is None
    torch.testing.assert_close(got.alpha_logit, layer.alpha_logit)
    with pytest.raises(ValueError, match="version 4, this attnplug reads 1, 2 and 3"):
        _backend("running").load_state(tensors, {**meta, "version": 4})


# ---- the fused kernels in one pass (interpreter) -----------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("window,impl", [(0, "fused"), (2, "fused"), (2, "sdpa")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_one_pass_matches_reference(poison, window, impl, dtype):
    b, n = 2, N_COND + GRID[0] * GRID[1]
    q, k, v = _qkv(b, n, dtype, seed=window + 3)
    g = torch.Generator().manual_seed(4)
    pq = random_phi(DIM, 32, 16, 2, "elu+1", HEADS, generator=g)
    pk = random_phi(DIM, 32, 16, 2, "elu+1", HEADS, generator=g)
    idx = select_landmarks(n, N_COND, 0.1, 3, 0)[0]
    kw = {"window": window, "grid": GRID, "n_cond": N_COND} if window else {}
    logit, aff = torch.tensor([-1.0, 0.5]), [0.1, 0.01, -0.1, 0.02]
    ref_call = ttr_forward_reference(q, k, v, pq, pk, idx, logit, 0.9, 2.0, True, branch_affine=aff, **kw)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for d_ref in (torch.tensor([0.02, 0.05]), torch.tensor([3.0, 0.5])):
        ref = ttr_forward_reference(q, k, v, pq, pk, idx, logit, 0.9, 2.0, True, branch_affine=aff,
                                    d_reference=d_ref, **kw)
        out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=logit, alpha_max=0.9, adaptive=True,
                                branch_affine=aff, config=SMALL_TILES, strict=True, landmark_impl=impl,
                                d_reference=d_ref, **kw)
        assert _rel(out, ref) < tol, (d_ref, _rel(out, ref))
        assert _rel(ref, ref_call) > 20 * tol  # the reference changes α: the check above can fail


@interpreted
def test_fused_one_pass_launches_the_landmark_pass_once(poison, monkeypatch):
    """With a reference the adaptive layer is one launch of the query kernel (plus the key pass), not two."""
    from attnplug.plugins.ttr.kernels import triton_ttr

    modes: list[int] = []
    real = triton_ttr._query_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                modes.append(kwargs["MODE"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_ttr, "_query_kernel", Spy())
    n = N_COND + GRID[0] * GRID[1]
    q, k, v = _qkv(1, n, seed=5)
    phi = random_phi(DIM, 32, 16, 2, "elu+1", None, generator=torch.Generator().manual_seed(0))
    idx = select_landmarks(n, N_COND, 0.1, 3, 0)[0]
    kw = {"window": 2, "grid": GRID, "n_cond": N_COND, "config": SMALL_TILES, "strict": True, "landmark_idx": idx}
    ttr_forward_fused(q, k, v, phi, phi, **kw)
    assert modes == [2, 3]
    modes.clear()
    ttr_forward_fused(q, k, v, phi, phi, d_reference=torch.tensor([0.1, 0.2]), **kw)
    assert modes == [4]
    with pytest.raises(ValueError, match=r"d_reference: expected \[2\]"):
        ttr_forward_fused(q, k, v, phi, phi, d_reference=torch.ones(3), **kw)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backend_serves_the_running_reference_fused_as_its_pytorch_path(poison, dtype):
    fused, ref = _backend("running", kernel="triton"), _backend("running")
    spec = LayerSpec("single:0", HEADS, DIM)
    layer = fused.layer(spec, torch.device("cpu"))
    with torch.no_grad():
        layer.conditioner.fc2.bias.copy_(torch.tensor([0.1, 0.02, -0.1, 0.01]))
        layer.alpha_logit.copy_(torch.tensor([-1.0, 1.0]))
    layer.set_d_reference(torch.tensor([0.01, 0.4]))
    ref.layer(spec, torch.device("cpu")).load_state_dict(layer.state_dict())
    assert ref.layers["single:0"].running_reference() is not None
    q, k, v = _qkv(2, N_COND + 36, dtype, seed=9)
    with torch.inference_mode():
        a, b = fused.forward(q, k, v, _call()), ref.forward(q, k, v, _call())
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


# ---- GPU: a Flux shape in bf16 -------------------------------------------------------------------------------
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("impl", ["fused", "sdpa"])
def test_gpu_flux_shape_one_pass(poison, impl):
    """Flux 1024² (64×64 grid, 512 text tokens, 24 heads × 128), r = 2, default tiles, bf16: the one-pass blend
    (in-kernel landmarks, and cuDNN's landmarks continued over the window) against the fp32 reference."""
    n_txt, side, heads, dim = 512, 64, 24, 128
    grid = (side, side)
    n = n_txt + side * side
    q, k, v = _qkv(1, n, torch.bfloat16, "cuda", seed=n, heads=heads, dim=dim)
    g = torch.Generator().manual_seed(0)
    pq = random_phi(dim, 256, 128, 2, "elu+1", None, generator=g, device="cuda")
    pk = random_phi(dim, 256, 128, 2, "elu+1", None, generator=g, device="cuda")
    idx = select_landmarks(n, n_txt, 0.02, 16, 0)[0].cuda()
    kw = {"window": 2, "grid": grid, "n_cond": n_txt}
    d_ref = torch.linspace(0.01, 0.5, heads, device="cuda")
    ref = ttr_forward_reference(q, k, v, pq, pk, idx, 0.0, 1.0, 2.0, True, d_reference=d_ref, **kw)
    ref_call = ttr_forward_reference(q, k, v, pq, pk, idx, 0.0, 1.0, 2.0, True, **kw)
    out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=0.0, alpha_max=1.0, adaptive=True,
                            strict=True, landmark_impl=impl, d_reference=d_ref, **kw)
    err = _rel(out, ref)
    assert err < 2e-2, err
    assert _rel(ref, ref_call) > 5 * err and math.isfinite(err)  # the reference changes the output beyond the error
