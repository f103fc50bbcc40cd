"""The landmark softmax by cuDNN (torch SDPA) before the landmark pass: when it pays, and how it stays within memory.

cuDNN computes out_l over the gathered landmark keys into the buffer that becomes the layer's output, and with a
window also each row's log-sum-exp, from which the landmark pass continues the softmax over the window (cuDNN
cannot mask per query itself). On a CPU (the interpreter tests) plain PyTorch stands in.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .tiles import KernelConfig, cdiv, output_like
from .tma_landmarks import tma_unsupported_reason

log = logging.getLogger("attnplug")
_TMA_DECLINED: set[str] = set()  # reasons already warned

#: landmark_impl "auto" takes cuDNN beyond this many query·landmark pairs. Its per-head-group launches (~100
#: host operations per call at 2048²) make it host-bound below: on an H200 the default layer at 2048² (3.1e7
#: pairs) was faster with cuDNN on device time (2.03 vs 2.60 ms) but its wall time swung from 2.2 to 4.0 ms with
#: the host's load, against a steady 2.35 ms in-kernel; the lean one at 2048² (1.4e7) is slower with it (2.1 vs
#: 1.26 ms); at 4096² (3.8e8) cuDNN wins clearly (12.4 vs 16.4 ms).
SDPA_MIN_PAIRS = 1e8

#: (device, dtype) where `attention_with_lse` failed (e.g. torch < 2.5, whose cuDNN op returns no log-sum-exp):
#: windowed calls there keep the in-kernel landmark softmax
_LSE_FAILED: set[tuple[torch.device, torch.dtype]] = set()


def lse_ok(q: torch.Tensor) -> bool:
    """Whether `attention_with_lse` serves q: cuDNN on CUDA in bf16/fp16; plain PyTorch on CPU (tests)."""
    if (q.device, q.dtype) in _LSE_FAILED:
        return False
    return q.device.type == "cpu" or (q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16))


def choose_landmark_impl(requested: str, q: torch.Tensor, n_landmarks: int, window: int) -> str:
    """'fused' (the landmark pass's own online softmax), 'sdpa' (cuDNN first) or 'tma' (the TMA-fed Triton kernel
    first, kernels/tma_landmarks.py) for `requested` ('auto', 'fused', 'sdpa' or 'tma'): 'auto' takes cuDNN on CUDA
    beyond `SDPA_MIN_PAIRS` query·landmark pairs; a window continues from cuDNN's log-sum-exp, which only cuDNN in
    bf16/fp16 gives (elsewhere, and without landmarks: 'fused'); 'tma' where `tma_unsupported_reason` declines q
    is 'fused', warned once per reason."""
    if requested not in ("auto", "fused", "sdpa", "tma"):
        raise ValueError(f"landmark_impl: expected 'auto', 'fused', 'sdpa' or 'tma', got {requested!r}")
    if n_landmarks == 0:
        return "fused"  # nothing to attend to first (a window alone runs in the landmark pass)
    if requested == "tma":
        reason = tma_unsupported_reason(q)
        if reason is None:
            return "tma"
        if reason not in _TMA_DECLINED:
            _TMA_DECLINED.add(reason)
            log.warning("attnplug: ttr kernels: the TMA-fed landmark softmax cannot serve this call (%s); the "
                        "landmark pass's own softmax does", reason)
        return "fused"
    impl = requested
    if impl == "auto":
        # measured on an H200 (docs/PERFORMANCE.md): the in-kernel softmax wins at ~840 landmarks x 4.6k queries,
        # cuDNN from ~1.8k x 66k on (one call over all heads there, within sdpa_memory_fraction)
        impl = "sdpa" if q.device.type == "cuda" and q.shape[2] * n_landmarks > SDPA_MIN_PAIRS else "fused"
    if window > 0 and not lse_ok(q):
        impl = "fused"
    return impl


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax(q kᵀ / √D) v` in q's dtype and its log-sum-exp `[B, H, N]` (fp32, natural log): cuDNN's
    attention on CUDA (torch's SDPA op that also returns it), plain PyTorch on CPU (interpreter tests)."""
    if q.device.type == "cuda":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)
        return res[0], res[1].reshape(q.shape[:-1])
    sc = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(sc, dim=-1), v.float()).to(q.dtype), torch.logsumexp(sc, dim=-1)


def sdpa_chunks(nq: int, heads: int, n_lm: int, config: KernelConfig) -> tuple[int, int]:
    """`(heads per group, rows per chunk)` of the SDPA landmark path.

    Per group of g heads it holds the gathered landmark K and V (2·L rows) and one chunk of r rows of
    out_l, g·(2L + r) rows of D values against the output's nq·heads: the largest g and then the most
    rows (the fewest, fullest cuDNN launches) within `sdpa_memory_fraction` of that, never fewer than
    `sdpa_min_rows` rows (one head per group then, whatever the budget), chunks balanced."""
    budget = config.sdpa_memory_fraction * nq * heads
    group = max(1, min(heads, int(budget // (2 * n_lm + nq))))
    rows = int(budget // group) - 2 * n_lm
    rows = min(nq, max(config.sdpa_min_rows, rows, 1))
    return group, cdiv(nq, cdiv(nq, rows))


def sdpa_landmarks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, config: KernelConfig,
                   with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`(out, lse)`: out_l by SDPA (cuDNN) over the landmarks `idx`, in the buffer that becomes the layer's
    output (the landmark pass and adaptive pass 2 then write into it), and with `with_lse` each row's
    log-sum-exp `[B, H, N]` (a window continues the softmax from it).

    Where every head's landmark K/V fit within `sdpa_memory_fraction` of the output (`config.sdpa_whole`;
    4096²-class sizes at the 2 % default), one call over all heads, whose own result is the output: no copy
    and no second buffer. Else per head group and row chunk into a fresh output (`sdpa_chunks`: one group's
    landmark K/V and one chunk's result are the extra memory). Returns None where SDPA cannot give the
    log-sum-exp (torch < 2.5's cuDNN op; warned once per device and dtype, which `lse_ok` then declines):
    the caller runs the in-kernel softmax."""
    bsz, heads, nq, d = q.shape
    n_lm = idx.numel()
    try:
        if config.sdpa_whole and 2 * n_lm <= config.sdpa_memory_fraction * nq:
            kg, vg = k.index_select(2, idx), v.index_select(2, idx)
            if not with_lse:
                return F.scaled_dot_product_attention(q, kg, vg), None
            out, lse = attention_with_lse(q, kg, vg)
            return out, lse.contiguous()
        out = output_like(q, v.shape[-1])
        lse = torch.empty(bsz, heads, nq, device=q.device, dtype=torch.float32) if with_lse else None
        group, rows = sdpa_chunks(nq, heads, n_lm, config)
        for h0 in range(0, heads, group):
            h1 = min(heads, h0 + group)
            kg = k[:, h0:h1].index_select(2, idx)
            vg = v[:, h0:h1].index_select(2, idx)
            for m0 in range(0, nq, rows):
                m1 = min(nq, m0 + rows)
                qc = q[:, h0:h1, m0:m1]
                if lse is not None:
                    out[:, h0:h1, m0:m1], lse[:, h0:h1, m0:m1] = attention_with_lse(qc, kg, vg)
                else:
                    out[:, h0:h1, m0:m1] = F.scaled_dot_product_attention(qc, kg, vg)
            del kg, vg
        return out, lse
    except (RuntimeError, TypeError) as exc:  # torch < 2.5: the op has no log-sum-exp argument (TypeError)
        if not with_lse or isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        _LSE_FAILED.add((q.device, q.dtype))
        log.warning("attnplug: ttr kernels: SDPA with its log-sum-exp failed on %s %s (%s: %s); windowed calls "
                    "there use the in-kernel landmark softmax", q.device, q.dtype, type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        return None
