"""The TMA-fed landmark softmax (`landmark_impl = "tma"`, kernels/tma_landmarks.py) against the PyTorch reference.

CPU: Triton's interpreter at small sizes in fp32 — the hybrid layer (fixed α, adaptive α in two passes and in one,
the window continued from the kernel's log-sum-exp), whole and partial landmark tiles, a batch with the hosts'
tokens-by-heads memory; where it declines a call, and what happens when its kernel fails (the joint layer's pass
after it: tests/test_ttr_joint_fused.py). GPU
(skipped without CUDA): a Flux shape in bf16. Outputs are poisoned (NaN) before each check, so an element the
kernels leave unwritten fails.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import gpu, interpreted  # noqa: E402

from attnplug.plugins.landmark.selection import select_landmarks  # noqa: E402
from attnplug.plugins.ttr.kernels import (KernelConfig, ServePlan, random_phi, ttr_forward_fused,  # noqa: E402
                                          ttr_forward_reference)
from attnplug.plugins.ttr.kernels import cudnn_landmarks, launchers, tma_landmarks  # noqa: E402

N_COND = 5
SMALL = KernelConfig(tma_block_m=16, tma_block=16, tma_warps=2, tma_stages=1, sdpa_lm_block_m=16, sdpa_lm_warps=2,
                     q_block_m=16, q_warps=2, q_stages=1, kv_block_n=16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "output has non-finite (unwritten) elements"
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _inputs(b: int, h: int, n: int, d: int, seed: int, tokens_by_heads: bool = False, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    return [x.transpose(1, 2).contiguous().transpose(1, 2) for x in xs] if tokens_by_heads else xs


class _Launches:
    """Counts the TMA-fed kernel's launches and keeps the landmark rows each read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: list[torch.Tensor] = []
        real = launchers.landmark_softmax_pass

        def launch(grid, q, kc, vc, *args, **kw):
            self.rows.append(kc)
            return real(grid, q, kc, vc, *args, **kw)

        monkeypatch.setattr(launchers, "landmark_softmax_pass", launch)


@interpreted
@pytest.mark.parametrize("window,grid", [(0, None), (2, (5, 13))], ids=["landmarks", "window"])
@pytest.mark.parametrize("alpha", ["fixed", "two-pass", "one-pass"])
def test_tma_landmark_softmax_matches_the_reference(poison, monkeypatch, window, grid, alpha):
    """The landmark pass goes on from the kernel's out_l (and, with a window, its log-sum-exp) to the reference's
    output, for every α mode; the kernel reads the rows the key pass wrote (one launch per call, no copy)."""
    b, h, d = 2, 3, 32
    n = N_COND + 65
    q, k, v = _inputs(b, h, n, d, seed=3, tokens_by_heads=True)
    g = torch.Generator().manual_seed(4)
    pq, pk = random_phi(d, 64, 32, 2, generator=g), random_phi(d, 64, 32, 2, generator=g)
    idx, _ = select_landmarks(n, N_COND, 0.2, 0, 0)
    d_ref = torch.tensor([0.2, 0.3, 0.25]) if alpha == "one-pass" else None
    kw = dict(alpha_logit=torch.tensor([-1.0, 0.3, 0.0]), alpha_max=0.5, gamma=2.0, adaptive=alpha != "fixed",
              branch_affine=[0.1, 0.01, -0.1, 0.02], window=window, grid=grid, n_cond=N_COND if window else 0,
              d_reference=d_ref)
    ref = ttr_forward_reference(q, k, v, pq, pk, idx, **kw)
    seen = _Launches(monkeypatch)
    out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, landmark_impl="tma", config=SMALL, strict=True,
                            landmark_prefix=N_COND, **kw)
    assert _rel(out, ref) < 1e-5
    assert out.transpose(1, 2).is_contiguous()  # laid out like the host's memory, as the other paths
    assert len(seen.rows) == 1 and seen.rows[0].shape == (b * h, idx.numel(), d)


@interpreted
@pytest.mark.parametrize("n_lm", [5, 16, 33])
def test_whole_and_partial_landmark_tiles(poison, n_lm):
    """Fewer landmarks than a tile, exactly one tile, two tiles and one landmark: the scores past the last
    landmark are masked in the loop."""
    b, h, n, d = 1, 2, 70, 32
    q, k, v = _inputs(b, h, n, d, seed=n_lm)
    g = torch.Generator().manual_seed(5)
    pq, pk = random_phi(d, 64, 32, 2, generator=g), random_phi(d, 64, 32, 2, generator=g)
    idx = torch.randperm(n, generator=g)[:n_lm].sort().values
    ref = ttr_forward_reference(q, k, v, pq, pk, idx, -0.5, 0.5, 2.0, False)
    out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=-0.5, alpha_max=0.5, adaptive=False,
                            landmark_impl="tma", config=SMALL, strict=True)
    assert _rel(out, ref) < 1e-5


@interpreted
def test_keys_the_key_pass_cannot_write_rows_from_are_copied(poison, monkeypatch):
    """Keys not contiguous in D: the key pass writes no rows, the landmark rows are copied for the kernel."""
    b, h, n, d = 1, 2, 40, 32
    q, k, v = _inputs(b, h, n, d, seed=8)
    k = torch.randn(b, h, d, n).transpose(2, 3)  # stride 1 along tokens, not along D
    g = torch.Generator().manual_seed(9)
    pq, pk = random_phi(d, 64, 32, 1, generator=g), random_phi(d, 64, 32, 1, generator=g)
    idx = torch.tensor([0, 1, 2, 9, 20, 31])
    seen = _Launches(monkeypatch)
    ref = ttr_forward_reference(q, k, v, pq, pk, idx, -1.0, 0.5, 2.0, False)
    out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=-1.0, alpha_max=0.5, adaptive=False,
                            landmark_impl="tma", config=SMALL, strict=True)
    assert _rel(out, ref) < 1e-5 and len(seen.rows) == 1


@interpreted
def test_a_failing_kernel_leaves_the_landmark_pass_to_compute_it(poison, monkeypatch, caplog):
    """The kernel raising (e.g. a Triton that cannot compile it): warned once, the in-kernel softmax serves that
    call and every later one, with the reference's output."""
    b, h, n, d = 1, 2, 50, 32
    q, k, v = _inputs(b, h, n, d, seed=11)
    g = torch.Generator().manual_seed(12)
    pq, pk = random_phi(d, 64, 32, 2, generator=g), random_phi(d, 64, 32, 2, generator=g)
    idx = torch.tensor([0, 1, 2, 3, 4, 17, 29, 41])
    calls = []

    def fail(*args, **kw):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(launchers, "landmark_softmax_pass", fail)
    plan = ServePlan(q, k, v, pq, pk, landmark_idx=idx, alpha_logit=-1.0, alpha_max=0.5, adaptive=False,
                     landmark_impl="tma", config=KernelConfig(lm_direct=2, kv_block_n=16), landmark_prefix=5)
    ref = ttr_forward_reference(q, k, v, pq, pk, idx, -1.0, 0.5, 2.0, False)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        for _ in range(2):
            assert _rel(plan(q, k, v), ref) < 1e-5
    assert plan.landmark_impl == "fused" and len(calls) == 1
    assert caplog.text.count("TMA-fed landmark softmax failed (RuntimeError: PassManager::run failed)") == 1


def test_calls_it_cannot_serve_take_the_landmark_pass_with_one_warning(caplog):
    """A head size that is not a power of two, or rows a descriptor cannot read, and the in-kernel softmax serves
    (warned once per reason); no landmarks: nothing to compute first; an unknown name is refused with the choices."""
    pytest.importorskip("triton")
    cudnn_landmarks._TMA_DECLINED.clear()
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        for _ in range(2):
            assert cudnn_landmarks.choose_landmark_impl("tma", torch.zeros(1, 2, 8, 24), 4, 0) == "fused"
    assert caplog.text.count("head size 24 is not a power of two") == 1
    odd = torch.zeros(1, 8, 3, 33)[..., :32].transpose(1, 2)  # rows of 33 floats: not 16-byte aligned
    assert tma_landmarks.tma_unsupported_reason(odd) is not None and not tma_landmarks.tma_rows_ok(odd)
    assert cudnn_landmarks.choose_landmark_impl("tma", torch.zeros(1, 2, 8, 32), 4, 2) == "tma"
    assert cudnn_landmarks.choose_landmark_impl("tma", torch.zeros(1, 2, 8, 32), 0, 2) == "fused"
    with pytest.raises(ValueError, match="'auto', 'fused', 'sdpa' or 'tma'"):
        cudnn_landmarks.choose_landmark_impl("flash", torch.zeros(1, 2, 8, 32), 4, 0)


def test_warp_specialisation_is_asked_for_where_the_compiler_gives_it(monkeypatch):
    """Never on a CPU; on CUDA from compute capability 9.0 with Triton ≥ 3.9 (versions read from their text)."""
    assert tma_landmarks._version("3.9.0") == (3, 9) and tma_landmarks._version("3.10.1+git") == (3, 10)
    assert tma_landmarks._version("3.6.0") < tma_landmarks.WARP_SPECIALIZE_SINCE
    assert not tma_landmarks.warp_specialized(torch.device("cpu"))


@gpu
@pytest.mark.parametrize("window", [0, 2])
def test_gpu_flux_shape_bf16(poison, window):
    """24 heads × 128, 512 text tokens, a 64 × 64 latent grid, 2 % landmarks: the compiled kernel (warp-specialised
    where `warp_specialized`) against the reference."""
    b, h, d, n_txt, grid = 1, 24, 128, 512, (64, 64)
    n = n_txt + grid[0] * grid[1]
    q, k, v = _inputs(b, h, n, d, seed=1, tokens_by_heads=True, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    pq = random_phi(d, 256, 128, 2, "elu+1", None, generator=g, device="cuda")
    pk = random_phi(d, 256, 128, 2, "elu+1", None, generator=g, device="cuda")
    idx, _ = select_landmarks(n, n_txt, 0.02, 16, 0)
    idx = idx.cuda()
    kw = dict(alpha_logit=-1.0, alpha_max=0.5, adaptive=True, window=window, grid=grid if window else None,
              n_cond=n_txt if window else 0)
    ref = ttr_forward_reference(q, k, v, pq, pk, idx, **kw)
    out = ttr_forward_fused(q, k, v, pq, pk, landmark_idx=idx, landmark_impl="tma", strict=True,
                            landmark_prefix=n_txt, **kw)
    assert _rel(out, ref) < 2e-2
