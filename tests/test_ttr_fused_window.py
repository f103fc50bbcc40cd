"""The landmark plugin's local window (`[plugins.landmark] window = r`) in the fused ttr kernels.

Three links, each tested: the landmark plugin's window math (`LandmarkBackend.branch`,
`landmark_window_softmax`) == the kernels' plain-PyTorch twin (`kernels.reference`, window args) ==
the fused Triton path (`ttr_forward_fused(window=, grid=, n_cond=)`); and the ttr backend serves the
window through the fused path with the output of its PyTorch path (the layer the distiller trains).

CPU: Triton's interpreter (TRITON_INTERPRET=1) at small grids, fp32 and fp16 (the interpreter gets bf16
wrong: ~5e7 relative error on the window-free path too). GPU (skipped without CUDA): a Flux shape in bf16.
Outputs are poisoned (NaN) before each check, so an element the kernels fail to write fails the test.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import HAS_CUDA, HAS_TRITON, interpreted  # noqa: E402

from attnplug.core import AttentionCall, LayerSpec
from attnplug.plugins.landmark.attention import landmark_softmax, landmark_window_softmax, window_table
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.landmark.selection import select_landmarks
from attnplug.plugins.landmark.settings import LandmarkSettings
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.kernels import (
    KernelConfig,
    fused_unsupported_reasons,
    landmark_window_reference,
    random_phi,
    ttr_forward_fused,
    ttr_forward_reference,
)
from attnplug.plugins.ttr.settings import TtrSettings

N_COND = 5
#: (3, 24): tiles of 16 rows that sit inside one grid row visit a box of columns, not the whole width
GRIDS = [(4, 8), (8, 4), (6, 6), (3, 10), (3, 24)]
#: landmark-pass tiles of 16 rows (narrower than the widest grid: a tile within one grid row visits a column
#: range) and of 64 rows (several grid rows: whole rows); 16 landmark keys per tile; 16 window keys per tile
#: (a grid row's span takes several) or the default (capped to the span: 16 or 32 here).
SMALL_TILES = KernelConfig(lm_block_m=16, lm_warps=2, lm_stages=1, lm_block=16, lm_window_block=16, q_block_m=16,
                           q_warps=2, q_stages=1)
LARGE_TILES = KernelConfig(lm_block_m=64, lm_warps=4, lm_stages=2, lm_block=16, q_block_m=32, q_warps=4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "output has non-finite (unwritten) elements"
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _call(grid, n_img, n_cond=N_COND):
    return AttentionCall("single:0", n_cond_tokens=n_cond, n_image_tokens=n_img, latent_grid=grid, sigma=0.6,
                         cfg_scale=3.0, host="test")


def _landmarks(radius: int, **kw) -> LandmarkBackend:
    """Few landmarks (windows hold many non-landmark keys), small query chunks (several chunks)."""
    return LandmarkBackend(LandmarkSettings(**{"fraction": 0.1, "min": 3, "query_chunk": 7, "window": radius, **kw}))


def _qkv(b, h, n, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


# ---- the reference against the landmark plugin ----------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("radius", [1, 2])
@pytest.mark.parametrize("layout", ["even", "stratified"])
def test_reference_window_is_the_landmark_plugins(grid, radius, layout):
    n_img = grid[0] * grid[1]
    q, k, v = _qkv(2, 2, N_COND + n_img, 8, seed=radius)
    call = _call(grid, n_img)
    lm = _landmarks(radius, layout=layout)
    idx, valid = lm.indices(k, call)
    assert valid is None
    table, inside = window_table(grid, radius)
    assert torch.isin(table[inside] + N_COND, idx).any()  # landmarks inside windows: counted once
    want = lm.branch(q, k, v, call)
    got = landmark_window_reference(q, k, v, idx, radius, grid, N_COND, chunk=9)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _rel(got, landmark_window_reference(q, k, v, idx, radius, grid, N_COND, chunk=1000)) < 1e-6
    # and the window changes the result (else the test could not fail)
    assert _rel(landmark_softmax(q, k[:, :, idx], v[:, :, idx]), want) > 1e-2


def _plugin_window(q, k, v, idx, radius, grid, n_cond, keep=None):
    """The landmark plugin's own functions with a given landmark set (also empty) and key padding."""
    b, nk = k.shape[0], k.shape[2]
    table, inside = window_table(grid, radius)
    win_idx = table + n_cond
    is_lm = torch.zeros(nk, dtype=torch.bool)
    is_lm[idx] = True
    allowed = (~is_lm)[None].expand(b, -1) if keep is None else keep & ~is_lm[None]
    win_ok = inside[None] & allowed[:, win_idx]
    k_l, v_l = k[:, :, idx], v[:, :, idx]
    out_img = landmark_window_softmax(q[:, :, n_cond:], k, v, k_l, v_l, None, win_idx, win_ok, chunk=6)
    return torch.cat([landmark_softmax(q[:, :, :n_cond], k_l, v_l, None), out_img], dim=2)


@pytest.mark.parametrize("masked", [False, True])
def test_reference_without_landmarks_and_with_key_padding(masked):
    """No landmarks: image queries see their window only, conditioning queries get zeros (the plugin's
    landmark_softmax over no key); padded window keys never count."""
    grid, radius = (5, 6), 1
    n = N_COND + 30
    q, k, v = _qkv(2, 2, n, 8, seed=4)
    keep = None
    if masked:
        keep = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.3
    for idx in (torch.zeros(0, dtype=torch.long), torch.tensor([0, 2, 4, N_COND + 7, N_COND + 20])):
        want = _plugin_window(q, k, v, idx, radius, grid, N_COND, keep)
        got = landmark_window_reference(q, k, v, idx, radius, grid, N_COND, keep)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    none = landmark_window_reference(q, k, v, None, radius, grid, N_COND, keep)
    assert torch.equal(none[:, :, :N_COND], torch.zeros_like(none[:, :, :N_COND]))


def test_window_arguments_are_checked():
    q, k, v = _qkv(1, 2, N_COND + 24, 16)
    phi = random_phi(16, 16, 16, 1)
    idx = torch.arange(N_COND)
    with pytest.raises(ValueError, match="grid: window = 2 needs the latent grid"):
        ttr_forward_fused(q, k, v, phi, phi, landmark_idx=idx, window=2, n_cond=N_COND)
    with pytest.raises(ValueError, match=r"h\*w \+ n_cond == Nk"):
        ttr_forward_fused(q, k, v, phi, phi, landmark_idx=idx, window=2, grid=(5, 5), n_cond=N_COND)
    with pytest.raises(ValueError, match="window: expected an int >= 0"):
        ttr_forward_fused(q, k, v, phi, phi, landmark_idx=idx, window=-1, grid=(4, 6), n_cond=N_COND)
    with pytest.raises(ValueError, match="n_cond"):
        ttr_forward_reference(q, k, v, phi, phi, idx, window=1, grid=(4, 6), n_cond=-1)
    with pytest.raises(ValueError, match="Nq == Nk"):
        ttr_forward_fused(q[:, :, :10], k, v, phi, phi, landmark_idx=idx, window=1, grid=(4, 6), n_cond=N_COND)
    ttr_forward_reference(q, k, v, phi, phi, idx, window=0, grid=(5, 5), n_cond=3)  # window 0: grid unused
    keep = torch.ones(1, N_COND + 24, dtype=torch.bool)
    assert any("key mask with a landmark window" in r
               for r in fused_unsupported_reasons(q, k, v, phi, phi, keep, None, window=1))


# ---- the fused kernels against the reference (interpreter) -------------------------------------------------
@interpreted
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("radius", [1, 2])
@pytest.mark.parametrize("config", [SMALL_TILES, LARGE_TILES], ids=["bm16", "bm64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_window_matches_reference(poison, grid, radius, config, dtype):
    b, h, d = 2, 2, 32
    n_img = grid[0] * grid[1]
    n = N_COND + n_img
    q, k, v = _qkv(b, h, n, d, dtype, seed=n + radius)
    g = torch.Generator().manual_seed(radius)
    pq = random_phi(d, 32, 32, 2, "elu+1", h, generator=g)
    pk = random_phi(d, 32, 32, 2, "elu+1", h, generator=g)
    idx = _landmarks(radius).indices(k, _call(grid, n_img))[0]
    logit = torch.tensor([-1.0, 0.5])
    aff = [0.1, 0.01, -0.1, 0.02]
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for adaptive in (True, False):  # MODE 2 + 3, and MODE 1
        ref = ttr_forward_reference(q, k, v, pq, pk, idx, logit, 0.9, 2.0, adaptive, branch_affine=aff,
                                    window=radius, grid=grid, n_cond=N_COND)
        out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=logit, alpha_max=0.9,
                                adaptive=adaptive, branch_affine=aff, config=config, strict=True, window=radius,
                                grid=grid, n_cond=N_COND)
        assert out.shape == ref.shape and out.dtype == dtype
        assert _rel(out, ref) < tol, (adaptive, _rel(out, ref))
        no_window = ttr_forward_reference(q, k, v, pq, pk, idx, logit, 0.9, 2.0, adaptive, branch_affine=aff)
        assert _rel(no_window, ref) > 20 * tol  # the window matters at this α: the check can fail


@interpreted
@pytest.mark.parametrize("grid", [(6, 6), (3, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("whole", [False, True], ids=["chunked", "whole"])
def test_sdpa_landmarks_continue_over_the_window(poison, grid, dtype, whole):
    """landmark_impl "sdpa" with a window: the landmark softmax by SDPA (here plain PyTorch; cuDNN on a GPU) per
    head group and row chunk — or in one call over all heads whose result becomes the output — its log-sum-exp
    handed to the landmark pass, which goes on over the window."""
    b, h, d, radius = 2, 2, 16, 2
    n_img = grid[0] * grid[1]
    q, k, v = _qkv(b, h, N_COND + n_img, d, dtype, seed=n_img)
    g = torch.Generator().manual_seed(1)
    pq = random_phi(d, 32, 16, 2, "elu+1", h, generator=g)
    pk = random_phi(d, 32, 16, 2, "elu+1", h, generator=g)
    idx = _landmarks(radius).indices(k, _call(grid, n_img))[0]
    chunked = KernelConfig(lm_block_m=16, lm_warps=2, lm_stages=1, lm_block=16, lm_window_block=16, q_block_m=16,
                           q_warps=2, q_stages=1, sdpa_memory_fraction=0.5, sdpa_min_rows=8,
                           sdpa_whole=whole)  # heads and rows chunked, unless whole (its landmarks fit the fraction)
    assert 2 * idx.numel() <= chunked.sdpa_memory_fraction * q.shape[2]
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for adaptive in (True, False):
        ref = ttr_forward_reference(q, k, v, pq, pk, idx, 0.5, 0.9, 2.0, adaptive, window=radius, grid=grid,
                                    n_cond=N_COND)
        out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=0.5, alpha_max=0.9, adaptive=adaptive,
                                landmark_impl="sdpa", config=chunked, strict=True, window=radius, grid=grid,
                                n_cond=N_COND)
        assert _rel(out, ref) < tol, (adaptive, _rel(out, ref))
    no_window = ttr_forward_reference(q, k, v, pq, pk, idx, 0.5, 0.9, 2.0, False)
    assert _rel(no_window, ref) > 20 * tol  # the window part is there: the check can fail


@interpreted
def test_sdpa_window_without_a_log_sum_exp_falls_back_to_the_in_kernel_softmax(poison, monkeypatch, caplog):
    """Where SDPA cannot return its log-sum-exp (torch < 2.5's cuDNN op), a windowed call is served by the
    in-kernel softmax — same output, warned once — and later calls on that device and dtype go there directly."""
    from attnplug.plugins.ttr.kernels import cudnn_landmarks

    grid, radius = (6, 6), 2
    q, k, v = _qkv(1, 2, N_COND + 36, 16, seed=4)
    g = torch.Generator().manual_seed(2)
    phi = random_phi(16, 16, 16, 1, generator=g)
    idx = _landmarks(radius).indices(k, _call(grid, 36))[0]
    kw = dict(landmark_idx=idx, alpha_logit=0.5, alpha_max=0.9, config=SMALL_TILES, strict=True, window=radius,
              grid=grid, n_cond=N_COND)
    want = ttr_forward_fused(q, k, v, phi, phi, landmark_impl="sdpa", **kw)
    calls = []

    def broken(*args):
        calls.append(1)
        raise TypeError("_scaled_dot_product_cudnn_attention(): argument 'dropout_p' must be float, not NoneType")

    monkeypatch.setattr(cudnn_landmarks, "attention_with_lse", broken)
    monkeypatch.setattr(cudnn_landmarks, "_LSE_FAILED", set())
    with caplog.at_level("WARNING"):
        first = ttr_forward_fused(q, k, v, phi, phi, landmark_impl="sdpa", **kw)
        second = ttr_forward_fused(q, k, v, phi, phi, landmark_impl="sdpa", **kw)
    assert _rel(first, want) < 1e-5 and torch.equal(first, second)
    assert len(calls) == 1  # the second call went to the in-kernel softmax at once
    assert sum("log-sum-exp failed" in r.getMessage() for r in caplog.records) == 1


@interpreted
@pytest.mark.parametrize("n_cond", [0, N_COND])
def test_fused_window_without_landmarks(poison, n_cond):
    """Window only: image queries over their windows, conditioning queries out_l = 0 (no key at all) —
    the landmark pass runs although there is no landmark; 'sdpa' is overridden (no landmark softmax to continue
    from)."""
    grid, radius = (3, 10), 2
    n = n_cond + 30
    q, k, v = _qkv(1, 2, n, 16, seed=9)
    g = torch.Generator().manual_seed(5)
    phi = random_phi(16, 16, 16, 1, generator=g)
    for adaptive in (True, False):
        ref = ttr_forward_reference(q, k, v, phi, phi, None, 0.0, 1.0, 2.0, adaptive, window=radius, grid=grid,
                                    n_cond=n_cond)
        for impl in ("fused", "sdpa", "auto"):
            out = ttr_forward_fused(q, k, v, phi, phi, landmark_idx=torch.zeros(0, dtype=torch.long),
                                    alpha_logit=0.0, alpha_max=1.0, adaptive=adaptive, landmark_impl=impl,
                                    config=SMALL_TILES, strict=True, window=radius, grid=grid, n_cond=n_cond)
            assert _rel(out, ref) < 1e-5, (adaptive, impl)
    kernel_only = ttr_forward_reference(q, k, v, phi, phi, None)
    assert _rel(kernel_only, ref) > 1e-2


@interpreted
def test_fused_window_with_key_mask_falls_back_to_the_reference():
    grid, radius = (4, 6), 1
    n = N_COND + 24
    q, k, v = _qkv(2, 2, n, 16, seed=2)
    phi = random_phi(16, 16, 16, 1, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, -5:] = False
    kw = {"window": radius, "grid": grid, "n_cond": N_COND, "key_mask": keep}
    with pytest.raises(RuntimeError, match="key mask with a landmark window"):
        ttr_forward_fused(q, k, v, phi, phi, strict=True, **kw)
    out = ttr_forward_fused(q, k, v, phi, phi, **kw)
    assert torch.equal(out, ttr_forward_reference(q, k, v, phi, phi, **kw))


# ---- the ttr backend: fused served output == PyTorch path (interpreter) -------------------------------------
def _pair(radius: int, **kw):
    lm = _landmarks(radius)
    fused = TtrBackend(TtrSettings(kernel="triton", feature_dim=16, hidden=32, **kw), landmark=lm.branch)
    ref = TtrBackend(TtrSettings(kernel="torch", feature_dim=16, hidden=32, **kw), landmark=lm.branch)
    spec = LayerSpec("single:0", 2, 16)
    layer = fused.layer(spec, torch.device("cpu"))
    with torch.no_grad():
        layer.conditioner.fc2.bias.copy_(torch.tensor([0.1, 0.02, -0.1, 0.01]))
        layer.alpha_logit.copy_(torch.tensor([-1.0, 1.0]))
    ref.layer(spec, torch.device("cpu")).load_state_dict(layer.state_dict())
    return fused, ref


@interpreted
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("grid", [(6, 6), (3, 10)])
def test_backend_serves_the_window_fused_as_its_pytorch_path(poison, adaptive, dtype, grid):
    fused, ref = _pair(2, adaptive_alpha=adaptive, alpha_max=0.9)
    n_img = grid[0] * grid[1]
    q, k, v = _qkv(2, 2, N_COND + n_img, 16, dtype, seed=n_img)
    call = _call(grid, n_img)
    with torch.inference_mode():
        a = fused(q, k, v, call)  # kernel = 'triton': the fused path or an error, never a silent fallback
        b = ref(q, k, v, call)
    assert a.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    # the served output has the window: a call without a grid (landmarks only) differs
    no_grid = ref(q, k, v, _call(None, n_img))
    assert _rel(no_grid, b) > 1e-2


@interpreted
@pytest.mark.parametrize("grid", [None, (5, 6)])
def test_backend_without_a_usable_grid_serves_the_landmarks_fused(poison, grid, caplog):
    """No grid, or one that does not hold the image tokens: the landmark branch uses the landmarks only, and so does
    the fused path (window 0; 'triton' serves it, no error, no PyTorch fallback), warned once per reason by the
    landmark backend whose plan both paths follow."""
    fused, ref = _pair(2)
    q, k, v = _qkv(1, 2, N_COND + 24, 16, seed=7)
    call = _call(grid, 24)
    with caplog.at_level("WARNING"), torch.inference_mode():
        a = fused(q, k, v, call)
        fused(q, k, v, call)
        b = ref(q, k, v, call)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    why = "needs the latent grid" if grid is None else "holds 30"
    assert sum(why in r.getMessage() and "single:0" in r.getMessage() for r in caplog.records) == 1
    with torch.inference_mode():  # the window matters where it applies: the check above can fail
        assert _rel(ref(q, k, v, _call((4, 6), 24)), b) > 1e-2


@interpreted
def test_backend_without_image_tokens_serves_fused_without_window(poison):
    """All queries are conditioning tokens: the landmark backend needs no window, neither do the kernels."""
    fused, ref = _pair(1)
    q, k, v = _qkv(1, 2, 24, 16, seed=3)
    call = AttentionCall("single:0", n_cond_tokens=24, n_image_tokens=0, sigma=0.6, host="test")
    with torch.inference_mode():
        torch.testing.assert_close(fused(q, k, v, call), ref(q, k, v, call), atol=1e-5, rtol=1e-5)


# ---- GPU: a Flux shape in bf16 ---------------------------------------------------------------------------
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("side", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_flux_shape_window(poison, side, dtype):
    """Flux 1024² (64×64 grid) and 2048² (128×128), 512 text tokens, 24 heads × 128, r = 2, default tiles; the
    landmark softmax in-kernel and by cuDNN (whose log-sum-exp the window part continues from) — per head, and
    in one call over all heads whose result becomes the output, with q, k, v in the `[B, N, H, D]` memory
    layout diffusers hands over (cuDNN's output then follows q's strides)."""
    b, h, d, n_txt, radius = 1, 24, 128, 512, 2
    grid = (side, side)
    n = n_txt + side * side
    q, k, v = _qkv(b, h, n, d, dtype=dtype, device="cuda", seed=n)
    g = torch.Generator().manual_seed(0)
    pq = random_phi(d, 256, 128, 2, "elu+1", None, generator=g, device="cuda")
    pk = random_phi(d, 256, 128, 2, "elu+1", None, generator=g, device="cuda")
    idx = select_landmarks(n, n_txt, 0.08, 64, 0)[0].cuda()
    for adaptive in (True, False):
        ref = ttr_forward_reference(q, k, v, pq, pk, idx, -2.2, 0.2, 2.0, adaptive, window=radius, grid=grid,
                                    n_cond=n_txt)
        lm_ref = landmark_window_reference(q, k, v, idx, radius, grid, n_txt)
        whole = KernelConfig(sdpa_memory_fraction=0.5)  # every head's landmark K/V fit: one cuDNN call
        bnhd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
        # in-kernel landmarks, or cuDNN's result and log-sum-exp (per head; all heads at once)
        for impl, cfg, (qi, ki, vi) in (("fused", None, (q, k, v)), ("sdpa", None, (q, k, v)),
                                        ("sdpa", whole, bnhd)):
            out = ttr_forward_fused(qi, ki, vi, pq, pk, landmark_idx=idx, alpha_logit=-2.2, adaptive=adaptive,
                                    strict=True, window=radius, grid=grid, n_cond=n_txt, landmark_impl=impl,
                                    config=cfg)
            assert _rel(out, ref) < 2e-2, (adaptive, impl, cfg)
            out_l = ttr_forward_fused(qi, ki, vi, pq, pk, landmark_idx=idx, alpha_logit=15.0, alpha_max=1.0,
                                      adaptive=False, strict=True, window=radius, grid=grid, n_cond=n_txt,
                                      landmark_impl=impl, config=cfg)
            assert _rel(out_l, lm_ref) < 2e-2, (impl, cfg)  # α ≈ 1: the landmark branch alone
