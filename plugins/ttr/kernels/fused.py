"""`ttr_forward_fused`: the inference fast path of the ttr layer, with a PyTorch fallback.

Uses the Triton kernels of `triton_ttr` on CUDA (or on CPU under `TRITON_INTERPRET=1`, for tests);
everywhere else — no Triton, no CUDA, autograd wanted, shapes the kernels do not cover — it runs
`reference.ttr_forward_reference`, the same math in plain PyTorch. `fused_unsupported_reasons`
says why a call would fall back.

The landmark plugin's local window (`window = r`, `grid = (h, w)`, `n_cond`) runs inside the landmark
pass: after the landmark tiles, the same online softmax continues over the image keys within
Chebyshev radius r of each image query (landmarks excluded, each key once); conditioning queries keep
the landmarks only. With cuDNN landmarks ("sdpa", bf16/fp16) cuDNN also returns each row's log-sum-exp,
and the landmark pass continues that softmax over the window (cuDNN cannot mask per query itself).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from .reference import PhiWeights, check_window, ttr_forward_reference

log = logging.getLogger("attnplug")

__all__ = ["KernelConfig", "fused_unsupported_reasons", "run_fused_kernels", "triton_available", "ttr_forward_fused"]

_MAX_REG_WIDTH = 256  # widest hidden / feature tile the kernels keep in registers


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of each pass (docs/PERFORMANCE.md, "Tile sizes"; sweep: `python -m attnplug.bench.tune`).

    Key pass: `kv_*`. Query passes: the landmark pass (fixed-α hybrid, adaptive pass 1 or one pass) tiles with `lm_*`
    (rows and warps from `sdpa_lm_*` when cuDNN gave the landmark softmax), the others (kernel-only,
    adaptive pass 2) with `q_*`; φ(q) is chunked by `lm_hidden_chunk` / `q_hidden_chunk`. A hidden chunk of 0,
    or one that is not a power of two ≥ 16 dividing the hidden width, computes a 2-layer φ's hidden tile at
    once. Defaults: sweeps of `bench.tune` on an H200 at 1024², 2048² and 4096² (sessions 3 and 6,
    docs/PERFORMANCE.md), each within a few % of the best at every size it applies to.
    """

    kv_block_n: int = 128  # key pass: keys per tile
    kv_warps: int = 8  # key pass: warps per program
    kv_stages: int = 3  # key pass: software-pipelining stages
    kv_programs_per_sm: int = 2  # key pass: split keys into chunks so that ~this many programs run per SM
    kv_hidden_chunk: int = 128  # key pass, 2-layer φ(k): hidden columns per step (0: all at once)
    q_block_m: int = 128  # kernel-only pass and adaptive pass 2: query rows per tile
    q_warps: int = 8  # kernel-only pass and adaptive pass 2: warps per program
    q_stages: int = 2  # kernel-only pass and adaptive pass 2: software-pipelining stages
    q_hidden_chunk: int = 0  # kernel-only pass and adaptive pass 2, 2-layer φ(q): hidden columns per step (0: all)
    lm_block_m: int = 128  # landmark pass (fixed-α hybrid, adaptive pass 1 or one pass): query rows per tile
    lm_hidden_chunk: int = 128  # landmark pass, 2-layer φ(q): hidden columns per step (fewer registers live
    # beside the landmark loops' state: 1572 vs 1677 µs at 2048², H200 session 6; pass 2 is faster whole)
    lm_warps: int = 8  # landmark pass: warps per program
    lm_stages: int = 3  # landmark pass: software-pipelining stages
    lm_block: int = 128  # landmark pass, in-kernel softmax (landmark_impl="fused"): landmark keys per tile
    lm_window_block: int = 64  # landmark pass with a window: window keys per tile (capped at the patch's key box)
    lm_patch_w: int = 16  # landmark pass with a window: image queries per tile as (lm_block_m / this) x this patches
    # the landmark pass when cuDNN gave the landmark softmax (it only reads that and goes on over the window): rows
    # per tile and warps — smaller tiles, two programs per SM (4096², H200 session 6: 6.98 vs 7.41 ms the call)
    sdpa_lm_block_m: int = 64
    sdpa_lm_warps: int = 4
    block_k: int = 64  # first in-kernel φ layer, every pass: input columns per step
    # landmark_impl="sdpa": out_l comes from cuDNN in one call over all heads, whose result is the output, where
    # all heads' landmark K/V copies fit within this fraction of the output's bytes (issue 8's memory target:
    # SDPA's peak + 10 %; the rest of the fused path adds ~3 %); else per head group and row chunk, the copies
    # and one chunk of out_l within it …
    sdpa_memory_fraction: float = 0.06
    sdpa_min_rows: int = 2048  # … with chunks of at least this many rows (small chunks under-fill the GPU)
    sdpa_whole: bool = True  # False: always per head group and row chunk (tests of that path)


DEFAULT_CONFIG = KernelConfig()
#: landmark_impl "auto" takes cuDNN beyond this many query·landmark pairs. Its per-head-group launches (~100
#: host operations per call at 2048²) make it host-bound below: on the H200 (session 4) the default layer at
#: 2048² (3.1e7 pairs) was faster with cuDNN on device time (2.03 vs 2.60 ms) but its wall time swung from
#: 2.2 to 4.0 ms with the host's load, against a steady 2.35 ms in-kernel; the lean one at 2048² (1.4e7) is
#: slower with it (2.1 vs 1.26 ms); at 4096² (3.8e8) cuDNN wins clearly (12.4 vs 16.4 ms).
_SDPA_MIN_PAIRS = 1e8


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on `device` (CUDA, or CPU with TRITON_INTERPRET=1)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cpu" and not interpret:
        return False, "CPU tensors (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
    if device.type not in ("cpu", "cuda"):
        return False, f"device {device.type} has no Triton kernels"
    if device.type == "cuda" and interpret:
        return False, "TRITON_INTERPRET=1 with CUDA tensors"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, ""


def _pow2(n: int) -> bool:
    return n >= 16 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class _Plan:
    """How one feature map splits into a cuBLAS prefix (torch) and the in-kernel rest."""

    prefix: int  # layers run by torch before the kernel (SiLU after each)
    depth: int  # layers run in-kernel: 0, 1 or 2 (0: the kernel reads pre-activations)
    din: int
    h1: int
    f1: int


def _plan(phi: PhiWeights) -> _Plan | str:
    f1 = int(phi.weights[-1].shape[-1])
    if not _pow2(f1) or f1 > _MAX_REG_WIDTH:
        return f"feature width {f1} of the last layer is not a power of two in [16, {_MAX_REG_WIDTH}]"
    dims = [int(w.shape[-2]) for w in phi.weights]
    depth = min(2, phi.depth)
    if depth == 2 and (not _pow2(dims[-1]) or dims[-1] > _MAX_REG_WIDTH):
        depth = 1
    if depth >= 1 and dims[phi.depth - depth] % 16:
        depth = 0  # the in-kernel first layer streams its input in chunks of 16, 32 or 64
    prefix = phi.depth - depth
    din = dims[phi.depth - depth] if depth else f1
    h1 = dims[-1] if depth == 2 else f1
    return _Plan(prefix=prefix, depth=depth, din=din, h1=h1, f1=f1)


def fused_unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: PhiWeights,
                              phi_k: PhiWeights, key_mask: torch.Tensor | None = None,
                              landmark_idx: torch.Tensor | None = None, window: int = 0) -> list[str]:
    """Every reason the fused path cannot serve this call (empty: it can)."""
    reasons: list[str] = []
    ok, why = triton_available(q.device)
    if not ok:
        reasons.append(why)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return reasons + [f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"]
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} must match and be fp16, bf16 or fp32")
    d = q.shape[-1]
    if not _pow2(d) or k.shape[-1] != d or v.shape[-1] != d:
        reasons.append(f"head dims q {d}, k {k.shape[-1]}, v {v.shape[-1]} must be equal powers of two >= 16")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *phi_q.weights, *phi_k.weights)):
        reasons.append("autograd is wanted (the fused path is inference-only)")
    if phi_q.activation != phi_k.activation or phi_q.feature_dim != phi_k.feature_dim:
        reasons.append(f"phi_q ({phi_q.activation}, F={phi_q.feature_dim}) and phi_k ({phi_k.activation}, "
                       f"F={phi_k.feature_dim}) must share activation and feature dim")
    for name, phi in (("phi_q", phi_q), ("phi_k", phi_k)):
        if phi.in_dim != d:
            reasons.append(f"{name}: input dim {phi.in_dim} != head_dim {d}")
        if phi.per_head and phi.weights[0].shape[0] != q.shape[1]:
            reasons.append(f"{name}: per-head weights for {phi.weights[0].shape[0]} heads, q has {q.shape[1]}")
        plan = _plan(phi)
        if isinstance(plan, str):
            reasons.append(f"{name}: {plan}")
    if landmark_idx is not None and landmark_idx.dim() != 1:
        reasons.append(f"landmark_idx must be one index set [L] shared by the batch, got {tuple(landmark_idx.shape)}")
    if key_mask is not None and landmark_idx is not None and landmark_idx.numel() > 0:
        reasons.append("a key mask with landmarks (per-batch landmark sets) is served by the PyTorch path")
    if key_mask is not None and window > 0:
        reasons.append("a key mask with a landmark window is served by the PyTorch path")
    return reasons


# ---- weight preparation (cast once per dtype, cached per live source storage and version) ---------
#: `(address, version, shape, strides, dtype, target dtype, device) -> (weak ref to the source's storage, cast)`
_PREP_CACHE: dict[tuple, tuple[StorageWeakRef, torch.Tensor]] = {}
_PREP_CACHE_MAX = 512


def _prep(t: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """`t` as a contiguous `dtype` tensor on `device`; a cast is made once and cached.

    An address is not an identity: once a weight is freed (a layer dropped or moved off the device, as
    `attnplug bench` drops every layer between shapes), another weight of the same shape can be allocated at
    the same address with the same version, and a cache keyed on the address alone served it the old
    weight's cast (the fused path then ran another layer's φ). So each entry holds a weak reference to its
    source's storage and counts only while that storage lives (a live storage owns its address); entries
    of dead storages are dropped. Writes that bypass the version counter (through `.data`) are not seen.
    """
    if t is None:
        return None
    t = t.detach()
    if t.dtype == dtype and t.device == device and t.is_contiguous():
        return t  # nothing to cast: no copy, no entry
    if t.is_inference():  # no version counter: an in-place change could not be seen, so no caching
        return t.to(device=device, dtype=dtype).contiguous()
    key = (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, dtype, device)
    entry = _PREP_CACHE.get(key)
    if entry is not None and not entry[0].expired():
        return entry[1]
    for k in [k for k, (ref, _) in _PREP_CACHE.items() if ref.expired()]:
        del _PREP_CACHE[k]  # casts of freed weights (and the stale entry at this key, if any)
    if len(_PREP_CACHE) >= _PREP_CACHE_MAX:
        _PREP_CACHE.clear()
    hit = t.to(device=device, dtype=dtype).contiguous()
    _PREP_CACHE[key] = (StorageWeakRef(t.untyped_storage()), hit)
    return hit


def _torch_prefix(x: torch.Tensor, phi: PhiWeights, plan: _Plan) -> torch.Tensor:
    """The layers before the in-kernel part, on cuBLAS in x's dtype (SiLU after each)."""
    for i in range(plan.prefix):
        w = _prep(phi.weights[i], x.dtype, x.device)
        x = torch.matmul(x, w)  # [B,H,N,Din] @ [Din,Dout] or [H,Din,Dout] (broadcast over B)
        b = phi.biases[i]
        if b is not None:
            b = _prep(b, x.dtype, x.device)
            x = x + (b if b.dim() == 1 else b[:, None, :])
        if i < phi.depth - 1:
            x = F.silu(x)
    return x


def _kernel_args(phi: PhiWeights, plan: _Plan, dtype: torch.dtype, device: torch.device, dummy: torch.Tensor):
    """Pointers, per-head strides and flags of the in-kernel layers."""
    layers = list(range(phi.depth - plan.depth, phi.depth))
    ws = [_prep(phi.weights[i], dtype, device) for i in layers]
    bs = [_prep(phi.biases[i], torch.float32, device) for i in layers]
    w1 = ws[0] if len(ws) >= 1 else dummy
    b1 = bs[0] if len(bs) >= 1 and bs[0] is not None else dummy
    w2 = ws[1] if len(ws) == 2 else dummy
    b2 = bs[1] if len(bs) == 2 and bs[1] is not None else dummy
    per_head = phi.per_head

    def hs(t: torch.Tensor) -> int:
        return t[0].numel() if per_head and t is not dummy else 0

    has_b1 = len(bs) >= 1 and bs[0] is not None
    has_b2 = len(bs) == 2 and bs[1] is not None
    return dict(w1=w1, b1=b1, w2=w2, b2=b2, w1h=hs(w1), b1h=hs(b1), w2h=hs(w2), b2h=hs(b2),
                HAS_B1=int(has_b1), HAS_B2=int(has_b2))


_ACT = {"elu+1": 0, "relu": 1, "hedgehog": 0}


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _block_k(want: int, din: int) -> int:
    """The widest chunk of the first layer's input (≤ want) that divides it."""
    for bk in (128, 64, 32, 16):
        if bk <= want and din % bk == 0:
            return bk
    return 16


def _hidden_chunk(want: int, h1: int) -> int:
    """Hidden columns per step of a 2-layer φ: `want` when it is a power of two ≥ 16 dividing h1, else all."""
    return want if want and _pow2(want) and want < h1 and h1 % want == 0 else h1


def _query_hidden_chunk(cfg: KernelConfig, plan: _Plan, landmark_pass: bool, mode: int) -> int:
    """Hidden columns per step of φ(q) in one query pass (`_hidden_chunk` of the pass's field).

    Adaptive pass 2 (mode 3) with the whole hidden tile and an input narrower than 64 (one K step of the first
    layer: head_dim 32) is miscompiled by Triton 3.6 on Hopper — compute-sanitizer reports out-of-range shared
    addresses in the first layer's dot and the launch faults (session 7; kernel-only, the landmark pass and a
    chunked pass 2 are clean) — so that pass is chunked there (by 128, the landmark pass's default chunk)."""
    hc = _hidden_chunk(cfg.lm_hidden_chunk if landmark_pass else cfg.q_hidden_chunk, plan.h1)
    if mode == 3 and plan.din < 64 and hc == plan.h1:
        return _hidden_chunk(128, plan.h1)
    return hc


def _patch_width(want: int, grid_w: int, block_m: int) -> int:
    """Columns of a query patch with a window: `want` (a power of two, ≤ the tile's rows), at most the grid's
    width to the next power of two (a narrow grid gets taller patches, not half-empty ones)."""
    pw = 1 << (max(1, min(want, block_m)) - 1).bit_length()
    return max(1, min(pw, 1 << (max(1, grid_w) - 1).bit_length(), block_m))


def _window_block(want: int, block_m: int, patch_w: int, window: int) -> int:
    """Window keys per tile: `want` (a power of two ≥ 16, else the next one), capped at the key box of one
    query patch (`(BM/PW + 2r)(PW + 2r)`, to the next power of two): no half-empty tiles on small windows."""
    box = (block_m // patch_w + 2 * window) * (patch_w + 2 * window)
    cap = max(16, 1 << (box - 1).bit_length())
    return min(max(16, 1 << (max(1, want) - 1).bit_length()), cap)


def _fast_silu(x: torch.Tensor) -> int:
    """Whether φ's in-kernel SiLU takes the hardware tanh (`triton_ttr._silu`): 16-bit inputs on a GPU, whose
    rounding before the next layer is coarser than its error; fp32 and the interpreter keep the exact form."""
    return int(x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16))


def _on_device(x: torch.Tensor | float | Sequence[float], device: torch.device) -> torch.Tensor:
    """`x` as fp32 on `device` without a device sync: Python numbers are copied with `non_blocking` (a
    blocking copy from CPU memory waits for everything queued on the GPU first)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.tensor(x, dtype=torch.float32).to(device, non_blocking=True)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: (device, dtype) where `_attention_with_lse` failed (e.g. torch < 2.5, whose cuDNN op returns no log-sum-exp):
#: windowed calls there keep the in-kernel landmark softmax
_LSE_FAILED: set[tuple[torch.device, torch.dtype]] = set()


def _lse_ok(q: torch.Tensor) -> bool:
    """Whether `_attention_with_lse` serves q: cuDNN on CUDA in bf16/fp16; plain PyTorch on CPU (tests)."""
    if (q.device, q.dtype) in _LSE_FAILED:
        return False
    return q.device.type == "cpu" or (q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16))


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax(q kᵀ / √D) v` in q's dtype and its log-sum-exp `[B, H, N]` (fp32, natural log): cuDNN's
    attention on CUDA (torch's SDPA op that also returns it), plain PyTorch on CPU (interpreter tests)."""
    if q.device.type == "cuda":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)
        return res[0], res[1].reshape(q.shape[:-1])
    sc = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(sc, dim=-1), v.float()).to(q.dtype), torch.logsumexp(sc, dim=-1)


def _sdpa_landmarks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, config: KernelConfig,
                    with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`(out, lse)`: out_l by SDPA (cuDNN) over the landmarks `idx`, in the buffer that becomes the layer's
    output (the landmark pass and adaptive pass 2 then write into it), and with `with_lse` each row's
    log-sum-exp `[B, H, N]` (a window continues the softmax from it).

    Where every head's landmark K/V fit within `sdpa_memory_fraction` of the output (`config.sdpa_whole`;
    4096²-class sizes at the 2 % default), one call over all heads, whose own result is the output: no copy
    and no second buffer. Else per head group and row chunk into a fresh output (`sdpa_chunks`: one group's
    landmark K/V and one chunk's result are the extra memory). Returns None where SDPA cannot give the
    log-sum-exp (torch < 2.5's cuDNN op; warned once per device and dtype, which `_lse_ok` then declines):
    the caller runs the in-kernel softmax."""
    bsz, heads, nq, d = q.shape
    n_lm = idx.numel()
    try:
        if config.sdpa_whole and 2 * n_lm <= config.sdpa_memory_fraction * nq:
            kg, vg = k.index_select(2, idx), v.index_select(2, idx)
            if not with_lse:
                return F.scaled_dot_product_attention(q, kg, vg), None
            out, lse = _attention_with_lse(q, kg, vg)
            return out, lse.contiguous()
        out = torch.empty(bsz, heads, nq, d, device=q.device, dtype=q.dtype)
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
                    out[:, h0:h1, m0:m1], lse[:, h0:h1, m0:m1] = _attention_with_lse(qc, kg, vg)
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
    return group, _cdiv(nq, _cdiv(nq, rows))


def kv_state_fused(k: torch.Tensor, v: torch.Tensor, phi_k: PhiWeights, key_mask: torch.Tensor | None = None,
                   config: KernelConfig = DEFAULT_CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `S` `[B, H, F, D]` and `z` `[B, H, F]` (fp32) — the key pass alone."""
    from .triton_ttr import _kv_state_kernel

    bsz, heads, n, d = k.shape
    plan = _plan(phi_k)
    assert not isinstance(plan, str), plan
    x = _torch_prefix(k, phi_k, plan) if plan.prefix else k
    if x.stride(-1) != 1:
        x = x.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    ft = phi_k.feature_dim
    bn = config.kv_block_n
    n_chunks = max(1, min(_cdiv(n, bn), _cdiv(config.kv_programs_per_sm * _num_sms(k.device),
                                                          bsz * heads)))
    chunk = _cdiv(_cdiv(n, n_chunks), bn) * bn
    n_chunks = _cdiv(n, chunk)
    s = torch.zeros(bsz, heads, ft, d, device=k.device, dtype=torch.float32)  # chunks add into it atomically
    z = torch.zeros(bsz, heads, ft, device=k.device, dtype=torch.float32)
    dummy = s
    wa = _kernel_args(phi_k, plan, k.dtype, k.device, dummy)
    if key_mask is not None:
        m = key_mask.to(device=k.device, dtype=torch.int8).contiguous()
        smb = m.stride(0)
    else:
        m, smb = dummy, 0
    _kv_state_kernel[(bsz * heads, n_chunks)](
        x, v, m, s, z, wa["w1"], wa["b1"], wa["w2"], wa["b2"],
        n, heads, chunk,
        x.stride(0), x.stride(1), x.stride(2), v.stride(0), v.stride(1), v.stride(2), smb,
        wa["w1h"], wa["b1h"], wa["w2h"], wa["b2h"], phi_k.norm_eps,
        D=d, DIN=plan.din, BK=_block_k(config.block_k, plan.din), H1=plan.h1, F1=plan.f1, DEPTH=plan.depth,
        ACT=_ACT[phi_k.activation], IS_HH=int(phi_k.activation == "hedgehog"), HAS_B1=wa["HAS_B1"],
        HAS_B2=wa["HAS_B2"], NORM=int(phi_k.l2_norm), HAS_MASK=int(key_mask is not None), BN=bn,
        HC=_hidden_chunk(config.kv_hidden_chunk, plan.h1), FAST_SILU=_fast_silu(x),
        num_warps=config.kv_warps, num_stages=config.kv_stages)
    return s, z


def ttr_forward_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: PhiWeights, phi_k: PhiWeights, *,
                      landmark_idx: torch.Tensor | None = None, alpha_logit: torch.Tensor | float = -2.1972,
                      alpha_max: float = 0.2, gamma: float = 2.0, adaptive: bool = True, eps: float = 1e-6,
                      key_mask: torch.Tensor | None = None,
                      branch_affine: Sequence[float] | torch.Tensor | None = None,
                      landmark_impl: str = "auto", config: KernelConfig | None = None,
                      strict: bool = False, window: int = 0, grid: tuple[int, int] | None = None,
                      n_cond: int = 0, d_reference: torch.Tensor | None = None) -> torch.Tensor:
    """The ttr layer's forward (inference): fused Triton kernels, else the PyTorch reference.

    Same math and arguments as `reference.ttr_forward_reference`; additionally
    `landmark_impl` ("fused": online softmax inside the query kernel; "sdpa": torch SDPA (cuDNN) on
    the gathered landmarks — in one call over all heads whose result becomes the output where their K/V copies
    fit `sdpa_memory_fraction`, else per head group and row chunk (`sdpa_chunks`) written into the output —
    read back by the landmark pass; "auto": "sdpa" on CUDA beyond 1e8 query·landmark pairs, else
    "fused"; both keep peak memory within SDPA's + 10 %, "sdpa" is faster at 4096²), `config` (tile
    sizes, SDPA chunking) and `strict` (raise instead of falling back). `window = r > 0` adds the landmark
    plugin's local window to the landmark branch
    (image queries also attend to the non-landmark image keys within Chebyshev radius r on the latent
    `grid` = (h, w), which holds the Nk − `n_cond` image tokens row-major after the `n_cond` conditioning
    tokens; queries must be the whole sequence; ValueError otherwise): with "sdpa" cuDNN also returns each
    row's log-sum-exp and the landmark pass continues that softmax over the window (bf16/fp16 on CUDA; other
    dtypes, and a window without landmarks, take "fused"); the landmark branch runs even without landmarks
    (conditioning queries then get out_l = 0, as the reference); a key mask falls back. Adaptive α runs two passes:
    pass 1 writes out_l into the output and d = 1 − cos(out_k, out_l); pass 2 recomputes the cheap kernel
    branch and blends in place, so no buffer the size of the output is added — unless `d_reference` (`[H]`, the
    layer's running mean of d, `alpha_reference = "running"`) replaces the mean of d over this call's queries:
    then the landmark pass blends in its epilogue, one pass.
    `alpha_logit` is a scalar or a per-head `[H]` tensor; `branch_affine` is `[4]` or `[B, 4]`.
    Returns `[B, H, Nq, D]` in q's dtype.
    """
    if q.dim() == 4 and k.dim() == 4:
        check_window(window, grid, n_cond, q.shape[2], k.shape[2])
    reasons = fused_unsupported_reasons(q, k, v, phi_q, phi_k, key_mask, landmark_idx, window)
    if reasons:
        if strict:
            raise RuntimeError("ttr_forward_fused cannot serve this call: " + "; ".join(reasons))
        return ttr_forward_reference(q, k, v, phi_q, phi_k, landmark_idx, alpha_logit, alpha_max, gamma, adaptive,
                                     eps, key_mask, branch_affine, window=window, grid=grid, n_cond=n_cond,
                                     d_reference=d_reference)
    return run_fused_kernels(q, k, v, phi_q, phi_k, landmark_idx=landmark_idx, alpha_logit=alpha_logit,
                             alpha_max=alpha_max, gamma=gamma, adaptive=adaptive, eps=eps, key_mask=key_mask,
                             branch_affine=branch_affine, landmark_impl=landmark_impl, config=config, window=window,
                             grid=grid, n_cond=n_cond, d_reference=d_reference)


def run_fused_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: PhiWeights, phi_k: PhiWeights, *,
                      landmark_idx: torch.Tensor | None = None, alpha_logit: torch.Tensor | float = -2.1972,
                      alpha_max: float = 0.2, gamma: float = 2.0, adaptive: bool = True, eps: float = 1e-6,
                      key_mask: torch.Tensor | None = None,
                      branch_affine: Sequence[float] | torch.Tensor | None = None,
                      landmark_impl: str = "auto", config: KernelConfig | None = None, window: int = 0,
                      grid: tuple[int, int] | None = None, n_cond: int = 0,
                      d_reference: torch.Tensor | None = None) -> torch.Tensor:
    """`ttr_forward_fused` without its checks, for a caller that ran them (the ttr backend decides between
    this and its own PyTorch path with `fused_unsupported_reasons`; checking twice cost every served call).
    The arguments must pass `check_window` and `fused_unsupported_reasons`."""
    if landmark_impl not in ("auto", "fused", "sdpa"):
        raise ValueError(f"landmark_impl: expected 'auto', 'fused' or 'sdpa', got {landmark_impl!r}")
    use_lm = landmark_idx is not None and landmark_idx.numel() > 0
    n_lm = int(landmark_idx.numel()) if use_lm else 0
    if landmark_impl == "auto":
        # measured on H200 (docs/PERFORMANCE.md): the in-kernel softmax wins at ~840 landmarks x 4.6k
        # queries, cuDNN from ~1.8k x 66k on (one call over all heads there, within sdpa_memory_fraction)
        landmark_impl = "sdpa" if q.device.type == "cuda" and q.shape[2] * n_lm > _SDPA_MIN_PAIRS else "fused"
    if window > 0 and (not use_lm or not _lse_ok(q)):
        landmark_impl = "fused"  # a window goes on from cuDNN's log-sum-exp, which only cuDNN (bf16/fp16) gives
    from .triton_ttr import _query_kernel

    cfg = config or DEFAULT_CONFIG
    with torch.no_grad():
        bsz, heads, nq, d = q.shape
        nk = k.shape[2]
        s, z = kv_state_fused(k, v, phi_k, key_mask, cfg)
        plan = _plan(phi_q)
        assert not isinstance(plan, str), plan
        x = _torch_prefix(q, phi_q, plan) if plan.prefix else q
        if x.stride(-1) != 1:
            x = x.contiguous()
        if q.stride(-1) != 1:
            q = q.contiguous()
        dummy = z  # stands in for pointer arguments a pass does not read
        wa = _kernel_args(phi_q, plan, q.dtype, q.device, dummy)
        use_branch = use_lm or window > 0  # a window runs the landmark branch even without landmarks
        idx = landmark_idx.to(device=q.device, dtype=torch.long).contiguous() if use_lm else dummy
        lm_flag = dummy
        grid_h, grid_w = (1, 1) if window == 0 else (int(grid[0]), int(grid[1]))  # type: ignore[index]
        if window > 0:  # int8 per key: 1 = a landmark (the window part skips it: the landmark loop counted it)
            lm_flag = torch.zeros(nk, dtype=torch.int8, device=q.device)
            if use_lm:
                lm_flag.index_fill_(0, idx, 1)
        kl, vl = k, v  # the fused softmax gathers landmark rows in-kernel: no copy (SDPA: `_sdpa_landmarks`)
        if kl.stride(-1) != 1 or vl.stride(-1) != 1:
            kl, vl = kl.contiguous(), vl.contiguous()
        skl = (kl.stride(0), kl.stride(1), kl.stride(2), vl.stride(0), vl.stride(1), vl.stride(2))
        logit = _on_device(alpha_logit, q.device).reshape(-1).contiguous()
        if logit.numel() not in (1, heads):
            raise ValueError(f"alpha_logit: expected a scalar or [{heads}] per head, got {logit.numel()} values")
        logit_h = 1 if logit.numel() == heads else 0
        aff = dummy
        if branch_affine is not None:
            aff = _on_device(branch_affine, q.device).reshape(-1, 4)
            if aff.shape[0] not in (1, bsz):
                raise ValueError(f"branch_affine: expected [4] or [{bsz}, 4], got {tuple(aff.shape)}")
            aff = aff.expand(bsz, 4).contiguous()
        s_scale = 1.0 / max(1, nk)  # keeps S and z in range for fp16 dots; cancels in the ratio
        # S as the query passes' dot reads it: scaled and in q's dtype once here, not per query tile (fp32 S was
        # 64 KiB of reads and a cast per tile)
        s_q = (s * s_scale).to(q.dtype)
        del s  # the fp32 state is not read again: freed before the passes (peak memory)
        qk_scale = d ** -0.5 * 1.4426950408889634
        d_buf = d_sum = lse = dummy
        one_pass = use_branch and adaptive and d_reference is not None
        if one_pass:
            d_ref = d_reference.reshape(-1)
            if d_ref.numel() != heads:
                raise ValueError(f"d_reference: expected [{heads}] (one mean of d per head), got "
                                 f"{tuple(d_reference.shape)}")
            # in the sum-of-d argument, per head (the kernel reads it as the mean; no copy when it is the layer's
            # fp32 buffer on q's device)
            d_sum = d_ref.to(device=q.device, dtype=torch.float32).contiguous()
        elif use_branch and adaptive:
            d_buf = torch.empty(bsz, heads, nq, device=q.device, dtype=torch.float32)
            d_sum = torch.zeros(bsz * heads, device=q.device, dtype=torch.float32)  # pass 1 adds into it

        def launch(mode: int, lm_src: int) -> None:
            # the landmark pass (modes 1, 2, 4) has its own tiles (from cuDNN's softmax: sdpa_lm_*); kernel-only
            # (0) and adaptive pass 2 (3) share q_*
            landmark_pass = mode in (1, 2, 4)
            if landmark_pass:
                bm, warps = (cfg.sdpa_lm_block_m, cfg.sdpa_lm_warps) if lm_src else (cfg.lm_block_m, cfg.lm_warps)
                stages = cfg.lm_stages
            else:
                bm, warps, stages = cfg.q_block_m, cfg.q_warps, cfg.q_stages
            win = int(window) if landmark_pass else 0
            pw = _patch_width(cfg.lm_patch_w, grid_w, bm) if win else 0
            n_text_tiles = _cdiv(int(n_cond), bm) if win else 0
            # with a window: the conditioning rows, then (BM/PW x PW) patches of the latent grid
            tiles = n_text_tiles + _cdiv(grid_h, bm // pw) * _cdiv(grid_w, pw) if win else _cdiv(nq, bm)
            _query_kernel[(tiles, bsz * heads)](
                q, x, s_q, z, kl, vl, idx, lm_flag, out, d_buf, d_sum, lse, logit, aff,
                wa["w1"], wa["b1"], wa["w2"], wa["b2"],
                nq, n_lm, heads, int(n_cond) if window else 0, n_text_tiles, grid_h, grid_w, s_scale,
                eps * 1.0, float(alpha_max), float(gamma), qk_scale, phi_q.norm_eps,
                q.stride(0), q.stride(1), q.stride(2), x.stride(0), x.stride(1), x.stride(2), *skl,
                out.stride(0), out.stride(1), out.stride(2),
                wa["w1h"], wa["b1h"], wa["w2h"], wa["b2h"], logit_h,
                D=d, DIN=plan.din, BK=_block_k(cfg.block_k, plan.din), H1=plan.h1, F1=plan.f1, DEPTH=plan.depth,
                ACT=_ACT[phi_q.activation], IS_HH=int(phi_q.activation == "hedgehog"), HAS_B1=wa["HAS_B1"],
                HAS_B2=wa["HAS_B2"], NORM=int(phi_q.l2_norm), MODE=mode, LM_SRC=lm_src,
                HAS_AFF=int(branch_affine is not None), BM=bm, BL=cfg.lm_block,
                HC=_query_hidden_chunk(cfg, plan, landmark_pass, mode), WIN=win,
                BLW=_window_block(cfg.lm_window_block, bm, pw, win) if win else 16, PW=pw, FAST_SILU=_fast_silu(x),
                num_warps=warps, num_stages=stages)

        # cuDNN's landmark softmax (with a window also its log-sum-exp, from which the landmark pass goes on) in the
        # buffer that becomes the output; else a fresh output
        res = _sdpa_landmarks(q, k, v, idx, cfg, window > 0) if use_branch and landmark_impl == "sdpa" else None
        if res is None:
            out = torch.empty(bsz, heads, nq, d, device=q.device, dtype=q.dtype)
        else:
            out, lse = res[0], dummy if res[1] is None else res[1]
        if not use_branch:
            launch(0, 0)
            return out
        if one_pass:
            launch(4, int(res is not None))
            return out
        launch(2 if adaptive else 1, int(res is not None))
        if adaptive:
            launch(3, 0)  # the mean of d: d_sum / Nq (pass 1 summed it)
        return out
