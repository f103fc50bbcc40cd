"""`ttr_forward_fused`: the ttr layer's inference forward on the Triton kernels, for library use, with a PyTorch
fallback.

Uses the kernels of `triton_ttr` on CUDA (or on CPU under `TRITON_INTERPRET=1`, for tests); everywhere else — no
Triton, no CUDA, autograd wanted, shapes the kernels do not cover — it runs `reference.ttr_forward_reference`, the
same math in plain PyTorch. `capability.fused_unsupported_reasons` says why a call would fall back. Each call
builds a `serve_plan.ServePlan` (weights cast, indices placed, launches described) and runs it: the ttr backend
instead keeps plans on its layers, so a served call only runs one.

The landmark plugin's local window (`window = r`, `grid = (h, w)`, `n_cond`) runs inside the landmark pass: after
the landmark tiles, the same online softmax continues over the image keys within Chebyshev radius r of each image
query (landmarks excluded, each key once); conditioning queries keep the landmarks only. With cuDNN landmarks
("sdpa", bf16/fp16) cuDNN also returns each row's log-sum-exp, and the landmark pass continues that softmax over
the window (cuDNN cannot mask per query itself).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ....core.exact_fp8 import fp8_unsupported_reason
from .capability import fused_unsupported_reasons
from .reference import PhiWeights, check_window, ttr_forward_reference
from .serve_plan import ServePlan, on_device
from .tiles import KernelConfig

__all__ = ["affine_rows", "kv_state_fused", "run_fused_kernels", "ttr_forward_fused"]


def affine_rows(branch_affine: Sequence[float] | torch.Tensor, bsz: int, device: torch.device) -> torch.Tensor:
    """`branch_affine` (`[4]` or `[B, 4]`, (s_k, b_k, s_l, b_l)) as the kernels read it: `[B, 4]` fp32, contiguous,
    on `device` (Python numbers are copied without a sync)."""
    aff = on_device(branch_affine, device).reshape(-1, 4)
    if aff.shape[0] not in (1, bsz):
        raise ValueError(f"branch_affine: expected [4] or [{bsz}, 4], got {tuple(aff.shape)}")
    return aff.expand(bsz, 4).contiguous()


def ttr_forward_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: PhiWeights, phi_k: PhiWeights, *,
                      landmark_idx: torch.Tensor | None = None, alpha_logit: torch.Tensor | float = -2.1972,
                      alpha_max: float = 0.2, gamma: float = 2.0, adaptive: bool = True, eps: float = 1e-6,
                      key_mask: torch.Tensor | None = None,
                      branch_affine: Sequence[float] | torch.Tensor | None = None,
                      landmark_impl: str = "auto", config: KernelConfig | None = None,
                      strict: bool = False, window: int = 0, grid: tuple[int, int] | None = None,
                      n_cond: int = 0, d_reference: torch.Tensor | None = None,
                      finite_flag: torch.Tensor | None = None, landmark_prefix: int | None = None,
                      exact_fp8: bool = False) -> torch.Tensor:
    """The ttr layer's forward (inference): fused Triton kernels, else the PyTorch reference.

    Same math and arguments as `reference.ttr_forward_reference`; additionally
    `landmark_impl` ("fused": online softmax inside the query kernel; "sdpa": torch SDPA (cuDNN) on
    the gathered landmarks — in one call over all heads whose result becomes the output where their K/V copies
    fit `sdpa_memory_fraction`, else per head group and row chunk (`sdpa_chunks`) written into the output —
    read back by the landmark pass; "tma": a Triton kernel of its own before the landmark pass, over the landmark
    rows the key pass writes contiguous, fed by TMA and warp-specialised where Triton can (kernels/tma_landmarks.py;
    opt-in, not timed yet); "auto": "sdpa" on CUDA beyond 1e8 query·landmark pairs, else
    "fused"; both keep peak memory within SDPA's + 10 %, "sdpa" is faster at 4096²), `config` (tile
    sizes, SDPA chunking) and `strict` (raise instead of falling back). `window = r > 0` adds the landmark
    plugin's local window to the landmark branch
    (image queries also attend to the non-landmark image keys within Chebyshev radius r on the latent
    `grid` = (h, w), which holds the Nk − `n_cond` image tokens row-major after the `n_cond` conditioning
    tokens; queries must be the whole sequence; ValueError otherwise): with "sdpa" cuDNN (with "tma" the kernel)
    also returns each row's log-sum-exp and the landmark pass continues that softmax over the window (bf16/fp16 on CUDA; other
    dtypes, and a window without landmarks, take "fused"); the landmark branch runs even without landmarks
    (conditioning queries then get out_l = 0, as the reference); a key mask falls back. Adaptive α runs two passes:
    pass 1 writes out_l into the output and d = 1 − cos(out_k, out_l); pass 2 recomputes the cheap kernel
    branch and blends in place, so no buffer the size of the output is added — unless `d_reference` (`[H]`, the
    layer's running mean of d, `alpha_reference = "running"`) replaces the mean of d over this call's queries:
    then the landmark pass blends in its epilogue, one pass.
    `alpha_logit` is a scalar or a per-head `[H]` tensor; `branch_affine` is `[4]` or `[B, 4]`.
    `finite_flag` (a one-element int32 tensor on q's device, fused path only): rows of the output that are not
    finite are replaced by the landmark branch's row (kernel-only: zeros) and the flag is set to 1, without a sync.
    `landmark_prefix`: how many leading landmark indices are the key rows 0 … n−1 (the conditioning tokens, loaded
    without the gather; `ServePlan`'s argument: None counts them only for CPU indices).
    `exact_fp8`: the landmark branch's products in e4m3 (core/exact_fp8.py; the in-kernel softmax then, and a GPU
    of compute capability 8.9 or newer, else the reference).
    Returns `[B, H, Nq, D]` in q's dtype.
    """
    if q.dim() == 4 and k.dim() == 4:
        check_window(window, grid, n_cond, q.shape[2], k.shape[2])
    reasons = fused_unsupported_reasons(q, k, v, phi_q, phi_k, key_mask, landmark_idx, window)
    no_fp8 = fp8_unsupported_reason(q.device) if exact_fp8 else ""
    if no_fp8:
        reasons.append(f"FP8: {no_fp8}")
    if reasons:
        if strict:
            raise RuntimeError("ttr_forward_fused cannot serve this call: " + "; ".join(reasons))
        return ttr_forward_reference(q, k, v, phi_q, phi_k, landmark_idx, alpha_logit, alpha_max, gamma, adaptive,
                                     eps, key_mask, branch_affine, window=window, grid=grid, n_cond=n_cond,
                                     d_reference=d_reference, exact_fp8=exact_fp8)
    return run_fused_kernels(q, k, v, phi_q, phi_k, landmark_idx=landmark_idx, alpha_logit=alpha_logit,
                             alpha_max=alpha_max, gamma=gamma, adaptive=adaptive, eps=eps, key_mask=key_mask,
                             branch_affine=branch_affine, landmark_impl=landmark_impl, config=config, window=window,
                             grid=grid, n_cond=n_cond, d_reference=d_reference, finite_flag=finite_flag,
                             landmark_prefix=landmark_prefix, exact_fp8=exact_fp8)


def run_fused_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: PhiWeights, phi_k: PhiWeights, *,
                      landmark_idx: torch.Tensor | None = None, alpha_logit: torch.Tensor | float = -2.1972,
                      alpha_max: float = 0.2, gamma: float = 2.0, adaptive: bool = True, eps: float = 1e-6,
                      key_mask: torch.Tensor | None = None,
                      branch_affine: Sequence[float] | torch.Tensor | None = None,
                      landmark_impl: str = "auto", config: KernelConfig | None = None, window: int = 0,
                      grid: tuple[int, int] | None = None, n_cond: int = 0,
                      d_reference: torch.Tensor | None = None,
                      finite_flag: torch.Tensor | None = None, landmark_prefix: int | None = None,
                      exact_fp8: bool = False) -> torch.Tensor:
    """`ttr_forward_fused` without its checks, for a caller that ran them: one `ServePlan`, built and run. The
    arguments must pass `check_window` and `fused_unsupported_reasons`."""
    with torch.no_grad():
        plan = ServePlan(q, k, v, phi_q, phi_k, landmark_idx=landmark_idx, alpha_logit=alpha_logit,
                         alpha_max=alpha_max, gamma=gamma, adaptive=adaptive, eps=eps, key_mask=key_mask is not None,
                         landmark_impl=landmark_impl, config=config, window=window, grid=grid, n_cond=n_cond,
                         d_reference=d_reference, landmark_prefix=landmark_prefix, exact_fp8=exact_fp8)
        aff = None if branch_affine is None else affine_rows(branch_affine, q.shape[0], q.device)
        if finite_flag is not None and (finite_flag.dtype != torch.int32 or finite_flag.device != q.device):
            raise ValueError(f"finite_flag: expected an int32 tensor on {q.device}, got {finite_flag.dtype} on "
                             f"{finite_flag.device}")
        return plan(q, k, v, key_mask=key_mask, branch_affine=aff, finite_flag=finite_flag)


def kv_state_fused(k: torch.Tensor, v: torch.Tensor, phi_k: PhiWeights, key_mask: torch.Tensor | None = None,
                   config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `S` `[B, H, F, D]` and `z` `[B, H, F]` (fp32) — the key pass alone."""
    with torch.no_grad():
        plan = ServePlan(k, k, v, phi_k, phi_k, key_mask=key_mask is not None, config=config)
        sz, z = plan.key_state(k, v, key_mask)
        bsz, heads, _, d = k.shape
        return sz[:plan.n_s].view(bsz, heads, plan.ft, d), z.view(bsz, heads, plan.ft)
