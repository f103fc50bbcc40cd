"""Fused ttr kernels vs the plain-PyTorch reference.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported) at small sizes;
skipped when triton is missing. GPU (skipped without CUDA): Flux shapes in bf16. Outputs are
poisoned (NaN) before each check, so an element the kernels fail to write fails the test.
"""
from __future__ import annotations

import importlib.util
import itertools
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnplug.plugins.landmark.selection import select_landmarks
from attnplug.plugins.ttr.kernels import (KernelConfig, PhiWeights, fused_unsupported_reasons, kv_state_fused,  # noqa: E402
                                          kv_state_reference, random_phi, ttr_forward_fused, ttr_forward_reference)
from attnplug.plugins.ttr.kernels import capability, cudnn_landmarks, launchers, tiles  # noqa: E402

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run on CPU-only machines")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "output has non-finite (unwritten) elements"
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def landmark_indices(n: int, n_cond: int, fraction: float, min_count: int = 0, device: str = "cpu") -> torch.Tensor:
    """The landmark plugin's own selection (the positions a served layer uses), unmasked."""
    idx, _ = select_landmarks(n, n_cond, fraction, min_count, 0)
    return idx.to(device)


def _inputs(b, h, n, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


#: SDPA landmarks per head group and in row chunks; the second also tiles the landmark pass (fixed-α hybrid,
#: adaptive pass 1) unlike the other query passes (kernel-only, adaptive pass 2), with another landmark tile.
CHUNKED = KernelConfig(sdpa_memory_fraction=0.5, sdpa_min_rows=16, sdpa_whole=False)  # 2 head groups × 2 row chunks
SPLIT_TILES = KernelConfig(q_block_m=16, q_warps=2, q_stages=1, lm_block_m=32, lm_warps=4, lm_stages=2,
                           lm_block=16, sdpa_memory_fraction=0.3, sdpa_min_rows=16)


@needs_triton
@cpu_only
@pytest.mark.parametrize("activation", ["elu+1", "relu", "hedgehog"])
@pytest.mark.parametrize("depth,hidden,per_head", [(1, 32, False), (2, 64, True), (3, 32, False)])
@pytest.mark.parametrize("config", [CHUNKED, SPLIT_TILES], ids=["chunked", "split-tiles"])
def test_interpreter_matches_reference(poison, activation, depth, hidden, per_head, config):
    b, h, n, d = 1, 2, 77, 32  # n not a multiple of any tile: exercises tail masking
    q, k, v = _inputs(b, h, n, d, seed=depth)
    g = torch.Generator().manual_seed(7)
    heads = h if per_head else None
    pq = random_phi(d, hidden, 32, depth, activation, heads, l2_norm=depth != 2, generator=g)
    pk = random_phi(d, hidden, 32, depth, activation, heads, l2_norm=depth != 2, generator=g)
    idx = landmark_indices(n, 8, 0.1)
    logit = torch.tensor([-2.2, 0.3])
    aff = [0.1, 0.01, -0.1, 0.02]
    variants = [(True, "fused"), (False, "fused")]
    if depth == 1:
        variants += [(True, "sdpa"), (False, "sdpa")]
    for adaptive, lm_impl in variants:
        ref = ttr_forward_reference(q, k, v, pq, pk, idx, logit, 0.2, 2.0, adaptive, branch_affine=aff)
        out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=logit, adaptive=adaptive,
                                branch_affine=aff, landmark_impl=lm_impl, config=config, strict=True)
        assert out.shape == ref.shape and out.dtype == q.dtype
        assert _rel(out, ref) < 1e-5, (adaptive, lm_impl)


@needs_triton
@cpu_only
def test_interpreter_kernel_only_key_mask_and_cublas_prefix(poison):
    b, h, n, d = 2, 2, 70, 32
    q, k, v = _inputs(b, h, n, d, seed=3)
    g = torch.Generator().manual_seed(1)
    # hidden 48 is not a power of two: the first layer runs on torch, the kernel reads pre-activations
    pq = random_phi(d, 48, 32, 2, "elu+1", None, l2_norm=True, generator=g)
    pk = random_phi(d, 48, 32, 2, "elu+1", None, l2_norm=True, generator=g)
    assert capability.phi_split(pk).depth == 1 and capability.phi_split(pk).prefix == 1
    mask = torch.rand(b, n, generator=g) > 0.3
    s, z = kv_state_fused(k, v, pk, mask)
    s_ref, z_ref = kv_state_reference(k, v, pk, mask)
    assert _rel(s, s_ref) < 1e-5 and _rel(z, z_ref) < 1e-5
    out = ttr_forward_fused(q, k, v, pq, pk, key_mask=mask, strict=True)
    ref = ttr_forward_reference(q, k, v, pq, pk, key_mask=mask)
    assert _rel(out, ref) < 1e-5


@needs_triton
@cpu_only
def test_layer_shaped_weights_match(poison):
    """Weights stored as plugins/ttr/layer.py does ([1, in, out] shared, biases [1, out])."""
    b, h, n, d = 1, 3, 40, 16
    q, k, v = _inputs(b, h, n, d, seed=5)
    g = torch.Generator().manual_seed(2)
    ws = (torch.randn(1, d, 64, generator=g) / 4, torch.randn(1, 64, 32, generator=g) / 8)
    bs = (torch.randn(1, 64, generator=g) * 0.1, torch.randn(1, 32, generator=g) * 0.1)
    phi = PhiWeights(ws, bs, activation="elu+1")
    out = ttr_forward_fused(q, k, v, phi, phi, strict=True)
    assert _rel(out, ttr_forward_reference(q, k, v, phi, phi)) < 1e-5


def test_fallback_reasons_and_path():
    q, k, v = _inputs(1, 2, 20, 32)
    phi = random_phi(32, 32, 32, 1)
    reasons = fused_unsupported_reasons(q.requires_grad_(), k, v, phi, phi)
    assert any("autograd" in r for r in reasons)
    out = ttr_forward_fused(q, k, v, phi, phi)  # falls back to the differentiable reference
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(RuntimeError, match="cannot serve"):
        ttr_forward_fused(q, k, v, phi, phi, strict=True)
    odd = random_phi(32, 32, 24, 1)
    assert any("power of two" in r for r in fused_unsupported_reasons(q.detach(), k, v, odd, odd))


@needs_triton
@cpu_only
@pytest.mark.parametrize("activation", ["elu+1", "hedgehog"])
@pytest.mark.parametrize("kv_chunk,q_chunk", [(16, 16), (32, 0), (0, 32)])
def test_interpreter_hidden_chunks_match_reference(poison, activation, kv_chunk, q_chunk):
    """A 2-layer φ computed a chunk of hidden columns at a time (KernelConfig.kv_hidden_chunk in the key
    pass, q_ / lm_hidden_chunk in the query passes; 0: all at once) is the same φ."""
    b, h, n, d = 1, 2, 77, 32
    q, k, v = _inputs(b, h, n, d, seed=11)
    g = torch.Generator().manual_seed(3)
    pq = random_phi(d, 64, 32, 2, activation, h, generator=g)
    pk = random_phi(d, 64, 32, 2, activation, h, generator=g)
    idx = landmark_indices(n, 8, 0.1)
    cfg = KernelConfig(kv_hidden_chunk=kv_chunk, q_hidden_chunk=q_chunk, lm_hidden_chunk=q_chunk)
    assert tiles.hidden_chunk(16, 64) == 16 and tiles.hidden_chunk(0, 64) == 64
    assert tiles.hidden_chunk(48, 64) == 64 and tiles.hidden_chunk(64, 64) == 64
    s, z = kv_state_fused(k, v, pk, config=cfg)
    s_ref, z_ref = kv_state_reference(k, v, pk)
    assert _rel(s, s_ref) < 1e-5 and _rel(z, z_ref) < 1e-5
    ref = ttr_forward_reference(q, k, v, pq, pk, idx, -1.0, 0.2, 2.0, True)
    out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=-1.0, adaptive=True,
                            landmark_impl="fused", config=cfg, strict=True)
    assert _rel(out, ref) < 1e-5


@needs_triton
@cpu_only
def test_each_pass_launches_with_its_own_tiles(poison, monkeypatch):
    """kv_* tile the key pass, lm_* the landmark pass (modes 1, 2; rows and warps sdpa_lm_* after cuDNN's
    landmark softmax), q_* kernel-only and pass 2 (modes 0, 3);
    kv_hidden_chunk / lm_hidden_chunk / q_hidden_chunk the φ of the key / landmark / other query passes."""
    from attnplug.plugins.ttr.kernels import triton_ttr

    launches: list[tuple] = []

    class Spy:
        """Records (kernel, MODE, LM_SRC, row tiles, BN, BM, HC, warps, stages) of a launch, then runs it."""

        def __init__(self, name: str):
            self.name, self.kernel = name, getattr(triton_ttr, name)

        def __getitem__(self, grid):
            def run(*args, **kw):
                launches.append((self.name, kw.get("MODE"), kw.get("LM_SRC"), grid[0], kw.get("BN"),
                                 kw.get("BM"), kw["HC"], kw["num_warps"], kw["num_stages"]))
                return self.kernel[grid](*args, **kw)
            return run

    for name in ("_kv_state_kernel", "_query_kernel"):
        monkeypatch.setattr(triton_ttr, name, Spy(name))
    b, h, n, d = 1, 2, 77, 32
    q, k, v = _inputs(b, h, n, d, seed=13)
    g = torch.Generator().manual_seed(4)
    pq = random_phi(d, 64, 32, 2, generator=g)
    pk = random_phi(d, 64, 32, 2, generator=g)
    idx = landmark_indices(n, 8, 0.1)
    cfg = KernelConfig(kv_block_n=32, kv_warps=2, kv_stages=1, kv_hidden_chunk=16, q_block_m=16, q_warps=2,
                       q_stages=1, q_hidden_chunk=32, lm_block_m=32, lm_warps=4, lm_stages=3, lm_block=16,
                       lm_hidden_chunk=16, sdpa_lm_block_m=16, sdpa_lm_warps=2, sdpa_min_rows=128)
    # query launches: (MODE, LM_SRC, row tiles of 77 rows, BM, warps, stages)
    for adaptive, lm_impl, want in [
        (True, "fused", [(2, 0, 3, 32, 4, 3), (3, 0, 5, 16, 2, 1)]),
        (False, "sdpa", [(1, 1, 5, 16, 2, 3)]),  # the landmark pass after cuDNN: sdpa_lm_* rows and warps
        (False, None, [(0, 0, 5, 16, 2, 1)]),  # kernel-only
    ]:
        launches.clear()
        lm = None if lm_impl is None else idx
        out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=lm, alpha_logit=-1.0, adaptive=adaptive,
                                landmark_impl=lm_impl or "auto", config=cfg, strict=True)
        ref = ttr_forward_reference(q, k, v, pq, pk, lm, -1.0, 0.2, 2.0, adaptive)
        assert _rel(out, ref) < 1e-5, lm_impl
        name, _, _, _, bn, _, hc, warps, stages = launches[0]
        assert (name, bn, hc, warps, stages) == ("_kv_state_kernel", 32, 16, 2, 1)
        got = [(mode, src, tiles, bm, w, st) for _, mode, src, tiles, _, bm, _, w, st in launches[1:]]
        assert got == want, lm_impl
        # lm_hidden_chunk in the landmark pass (modes 1, 2), q_hidden_chunk in the others
        assert [launch[6] for launch in launches[1:]] == [16 if m in (1, 2) else 32 for m, *_ in want], lm_impl


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("n_img", [4096, 16384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden_chunk", [0, 64])
def test_gpu_flux_shapes_bf16(poison, n_img, dtype, hidden_chunk):
    """Default tiles, or hidden chunks in both passes with a landmark pass of 128 rows × 8 warps."""
    b, h, d, n_txt = 1, 24, 128, 512
    n = n_txt + n_img
    q, k, v = _inputs(b, h, n, d, dtype=dtype, device="cuda", seed=n)
    g = torch.Generator().manual_seed(0)
    pq = random_phi(d, 256, 128, 2, "elu+1", None, generator=g, device="cuda")
    pk = random_phi(d, 256, 128, 2, "elu+1", None, generator=g, device="cuda")
    idx = landmark_indices(n, n_txt, 0.08, 64, device="cuda")
    cfg = (KernelConfig(kv_hidden_chunk=hidden_chunk, q_hidden_chunk=hidden_chunk, lm_block_m=128, lm_warps=8)
           if hidden_chunk else KernelConfig())
    for adaptive in (True, False):
        ref = ttr_forward_reference(q, k, v, pq, pk, idx, -2.2, 0.2, 2.0, adaptive)
        for lm_impl in ("fused", "sdpa"):
            out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=-2.2, adaptive=adaptive,
                                    landmark_impl=lm_impl, config=cfg, strict=True)
            assert _rel(out, ref) < 2e-2, (adaptive, lm_impl)


@needs_triton
@cpu_only
def test_interpreter_sdpa_landmarks_per_head_group_with_a_batch(poison):
    """cuDNN's (here: torch's) landmark softmax written into the output per head group and row chunk (or in one
    call over all heads, its result the output), then read back by one landmark pass: every (batch, head, row)
    lands where it belongs."""
    b, h, n, d = 2, 3, 70, 32
    q, k, v = _inputs(b, h, n, d, seed=21)
    g = torch.Generator().manual_seed(2)
    pq = random_phi(d, 64, 32, 2, generator=g)
    pk = random_phi(d, 64, 32, 2, generator=g)
    idx = torch.tensor([0, 1, 2, 3, 10, 25, 40, 55, 69])
    logit, aff = torch.tensor([-1.0, 0.3, 0.0]), [0.1, 0.0, -0.1, 0.02]
    chunked = KernelConfig(sdpa_memory_fraction=0.4, sdpa_min_rows=16, sdpa_whole=False)
    assert cudnn_landmarks.sdpa_chunks(n, h, idx.numel(), chunked) == (1, 35)  # 3 head groups × 2 row chunks
    whole = KernelConfig(sdpa_memory_fraction=0.4)  # all heads' landmark K/V fit: one call, its result the output
    for adaptive, config in itertools.product((True, False), (chunked, whole)):
        ref = ttr_forward_reference(q, k, v, pq, pk, idx, logit, 0.2, 2.0, adaptive, branch_affine=aff)
        out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=logit, adaptive=adaptive,
                                branch_affine=aff, landmark_impl="sdpa", config=config, strict=True)
        assert _rel(out, ref) < 1e-5, (adaptive, config.sdpa_whole)


@needs_triton
@cpu_only
@pytest.mark.parametrize("lm_impl,config", [("fused", KernelConfig()),
                                            ("sdpa", KernelConfig(sdpa_memory_fraction=0.4, sdpa_min_rows=16,
                                                                  sdpa_whole=False))], ids=["in-kernel", "cudnn"])
def test_output_is_laid_out_like_the_hosts_tokens_by_heads_memory(poison, lm_impl, config):
    """Hosts hand q, k, v as `[B, H, N, D]` views of `[B, N, H, D]` memory and flatten the heads back: the output
    comes laid out the same way (the host's transpose and flatten are then views, not a copy of the output), with
    the same values as from contiguous inputs."""
    b, h, n, d = 1, 3, 70, 32
    q, k, v = _inputs(b, h, n, d, seed=5)
    g = torch.Generator().manual_seed(6)
    pq, pk = random_phi(d, 64, 32, 2, generator=g), random_phi(d, 64, 32, 2, generator=g)
    idx = torch.tensor([0, 1, 2, 3, 10, 25, 40, 55, 69])
    kw = dict(landmark_idx=idx, alpha_logit=-1.0, landmark_impl=lm_impl, config=config, strict=True)
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    out = ttr_forward_fused(q_t, k_t, v_t, pq, pk, **kw)
    assert out.transpose(1, 2).is_contiguous()
    assert ttr_forward_fused(q, k, v, pq, pk, **kw).is_contiguous()
    assert _rel(out, ttr_forward_fused(q, k, v, pq, pk, **kw)) < 1e-6


@needs_triton
@cpu_only
@pytest.mark.parametrize("n_lm", [5, 16, 32, 33])
def test_interpreter_landmark_loop_whole_and_partial_tiles(poison, n_lm):
    """The landmark loop's tiles against the landmark count: fewer landmarks than a tile, exactly one and two
    tiles, and two tiles and one landmark all match the reference."""
    b, h, n, d = 1, 2, 70, 32
    q, k, v = _inputs(b, h, n, d, seed=n_lm)
    g = torch.Generator().manual_seed(3)
    pq = random_phi(d, 64, 32, 2, generator=g)
    pk = random_phi(d, 64, 32, 2, generator=g)
    idx = torch.randperm(n, generator=g)[:n_lm].sort().values
    cfg = KernelConfig(lm_block_m=32, lm_warps=4, lm_stages=1, lm_block=16, q_block_m=16, q_warps=2)
    for adaptive in (True, False):
        ref = ttr_forward_reference(q, k, v, pq, pk, idx, -0.5, 0.5, 2.0, adaptive)
        out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=-0.5, alpha_max=0.5,
                                adaptive=adaptive, landmark_impl="fused", config=cfg, strict=True)
        assert _rel(out, ref) < 1e-5, adaptive


@needs_triton
@cpu_only
@pytest.mark.parametrize("lm_direct", [1, 2])
@pytest.mark.parametrize("n_text,window", [(20, 0), (20, 2), (0, 2)], ids=["text", "text+window", "no-prefix"])
def test_interpreter_direct_landmark_loads_match_the_gathered_ones(poison, monkeypatch, lm_direct, n_text, window):
    """Landmarks that begin with key rows 0 … n−1 (the conditioning tokens) loaded as they lie, the rest gathered
    or copied contiguous: the same output as gathering every row (with a window too), and the same as the reference;
    indices that do not begin at row 0 fall back to the gather."""
    b, h, grid, d = 2, 2, (5, 6), 32
    n = 20 + grid[0] * grid[1]
    q, k, v = _inputs(b, h, n, d, seed=31)
    g = torch.Generator().manual_seed(7)
    pq, pk = random_phi(d, 64, 32, 2, generator=g), random_phi(d, 64, 32, 2, generator=g)
    image = torch.tensor([23, 31, 37, 44])
    idx = torch.cat([torch.arange(n_text), image]) if n_text else torch.cat([torch.tensor([3, 5]), image])
    kw = dict(landmark_idx=idx, alpha_logit=-0.5, alpha_max=0.5, adaptive=False, landmark_impl="fused", strict=True)
    if window:
        kw.update(window=window, grid=grid, n_cond=20)
    small = dict(lm_block_m=16, lm_warps=2, lm_stages=1, lm_block=16, lm_window_block=16, q_block_m=16, q_warps=2)
    gathered = ttr_forward_fused(q, k, v, pq, pk, config=KernelConfig(lm_direct=0, **small), **kw)
    ran: list[int] = []
    real = launchers.query_pass
    monkeypatch.setattr(launchers, "query_pass", lambda launch, *a: (ran.append(launch.consts["LM_DIRECT"]),
                                                                     real(launch, *a))[1])
    wrote: list[bool] = []  # whether each key pass wrote the landmark rows (2: the query pass then copies none)
    real_key = launchers.key_pass
    monkeypatch.setattr(launchers, "key_pass", lambda *a, **kw: (wrote.append(a[-1] is not None),
                                                                 real_key(*a, **kw))[1])
    direct = ttr_forward_fused(q, k, v, pq, pk, config=KernelConfig(lm_direct=lm_direct, **small), **kw)
    assert ran == [lm_direct if n_text else 0]  # the direct loads ran (or, without the prefix, the gather)
    assert wrote == [lm_direct == 2 and n_text > 0]
    if n_text:  # the caller's word for fewer rows than lead: those load directly, the rest are gathered
        ran.clear()
        wrote.clear()
        fewer = ttr_forward_fused(q, k, v, pq, pk, config=KernelConfig(lm_direct=lm_direct, **small),
                                  landmark_prefix=7, **kw)
        assert ran == [lm_direct] and _rel(fewer, gathered) < 1e-6
    if lm_direct == 2 and n_text:  # keys not contiguous in their last dim: the query pass copies the rows itself
        wrote.clear()
        k_strided = k.transpose(-1, -2).contiguous().transpose(-1, -2)
        copied = ttr_forward_fused(q, k_strided, v, pq, pk, config=KernelConfig(lm_direct=2, **small), **kw)
        assert wrote == [False] and _rel(copied, gathered) < 1e-6
    assert _rel(direct, gathered) < 1e-6
    if not window:
        assert _rel(direct, ttr_forward_reference(q, k, v, pq, pk, idx, -0.5, 0.5, 2.0, False)) < 1e-5
    assert tiles.leading_rows(idx) == n_text
    # the count a plan takes: the caller's word (clamped), else counted on the CPU, never read from a device
    assert tiles.direct_rows(idx, None) == n_text and tiles.direct_rows(idx, 3) == 3
    assert tiles.direct_rows(idx, 10 ** 6) == idx.numel() and tiles.direct_rows(idx.to("meta"), None) == 0
    if window:  # the joint layer's pass runs the same landmark loop
        from attnplug.plugins.ttr.kernels import JointServePlan

        def joint(**over):
            plan = JointServePlan(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=torch.full((h,), 0.3),
                                  log_scale_q=0.1 * torch.ones(h, d), landmark_impl="fused",
                                  config=KernelConfig(joint_block_m=16, joint_warps=2, joint_lm_block=16,
                                                      joint_window_block=16, lm_stages=1, **over),
                                  window=window, grid=grid, n_cond=20)
            return plan(q, k, v)
        want = joint(lm_direct=0)
        ran.clear()
        wrote.clear()
        assert _rel(joint(lm_direct=lm_direct), want) < 1e-6
        assert ran == [lm_direct if n_text else 0] and wrote == [lm_direct == 2 and n_text > 0]


@pytest.mark.parametrize("nq,n_lm", [(4608, 840), (16896, 1823), (66048, 5755), (77, 15), (3000, 4000)])
@pytest.mark.parametrize("fraction", [0.06, 0.3])
def test_sdpa_chunks_keep_the_memory_budget(nq, n_lm, fraction):
    """The SDPA landmark path holds one head group's landmark K/V and one row chunk of out_l: within
    `sdpa_memory_fraction` of the output (the memory target: SDPA's peak + 10 %), unless the minimum chunk alone exceeds
    it (then one head per group); the chunks cover every row and head."""
    heads = 24
    cfg = KernelConfig(sdpa_memory_fraction=fraction, sdpa_min_rows=min(2048, nq))
    group, rows = cudnn_landmarks.sdpa_chunks(nq, heads, n_lm, cfg)
    assert 1 <= group <= heads and 1 <= rows <= nq
    held = group * (2 * n_lm + rows)
    if held > fraction * nq * heads:  # only where the smallest chunk allowed does not fit
        assert group == 1 and rows <= cfg.sdpa_min_rows and 2 * n_lm + cfg.sdpa_min_rows > fraction * nq * heads
    if 2 * n_lm + nq <= fraction * nq * heads:
        assert rows == nq  # all rows in one launch whenever a head's whole out_l fits
    n_chunks = -(-nq // rows)
    assert (n_chunks - 1) * rows < nq <= n_chunks * rows


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("lm_impl", ["fused", "sdpa"])
def test_gpu_peak_memory_within_sdpas_plus_10_percent(lm_impl):
    """The memory target (SDPA's peak + 10 %) at 2048² (Flux shapes, default layer, bf16): the memory one call allocates
    beyond its inputs stays within cuDNN SDPA's + 10 %, with either landmark path."""
    import torch.nn.functional as F

    b, h, d, n_txt, n_img = 1, 24, 128, 512, 16384
    n = n_txt + n_img
    q, k, v = _inputs(b, h, n, d, dtype=torch.bfloat16, device="cuda", seed=1)
    g = torch.Generator().manual_seed(0)
    pq = random_phi(d, 256, 128, 2, "elu+1", None, generator=g, device="cuda")
    pk = random_phi(d, 256, 128, 2, "elu+1", None, generator=g, device="cuda")
    idx = landmark_indices(n, n_txt, 0.08, 64, device="cuda")

    def peak(fn) -> int:
        fn()  # compiled, casts cached
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - base
        del out
        return used

    sdpa = peak(lambda: F.scaled_dot_product_attention(q, k, v))
    ttr = peak(lambda: ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=-2.2,
                                         landmark_impl=lm_impl, strict=True))
    assert ttr <= 1.10 * sdpa, (ttr / 2 ** 20, sdpa / 2 ** 20)


def test_pass_2_chunks_phi_where_triton_miscompiles_the_whole_hidden_tile():
    """Adaptive pass 2 with a whole hidden tile and head_dim 32 faults on Hopper (Triton 3.6 miscompile, found
    with compute-sanitizer): that pass alone is chunked by 128 there; every other pass and head_dim keeps its tile."""
    from attnplug.plugins.ttr.kernels.tiles import query_hidden_chunk

    cfg = KernelConfig(q_hidden_chunk=0, lm_hidden_chunk=0)
    narrow = capability.phi_split(random_phi(32, 256, 128, 2, generator=torch.Generator().manual_seed(0)))
    wide = capability.phi_split(random_phi(128, 256, 128, 2, generator=torch.Generator().manual_seed(0)))

    def chunk(c, split, landmark_pass, mode):
        return query_hidden_chunk(c, split.din, split.h1, landmark_pass, mode)

    assert chunk(cfg, narrow, False, 3) == 128
    assert [chunk(cfg, narrow, m in (1, 2, 4), m) for m in (0, 1, 2, 4)] == [256] * 4
    assert chunk(cfg, wide, False, 3) == 256
    assert chunk(KernelConfig(q_hidden_chunk=64), narrow, False, 3) == 64  # a chunk already: kept
