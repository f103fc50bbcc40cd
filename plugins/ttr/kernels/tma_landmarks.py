"""The landmark softmax as its own Triton kernel fed by TMA (`landmark_impl = "tma"`): what it needs of the tensors,
where Triton warp-specialises it, and one call of it.

Like cuDNN's landmark softmax (`cudnn_landmarks`), it writes out_l into the buffer that becomes the layer's output
and, with a window, each row's log-sum-exp, from which the landmark pass goes on. Unlike cuDNN's, it reads the
landmark K and V rows that the key pass wrote contiguous as it read every key (no gather, no copy per call), and
its loop is one the compiler can pipeline and, from Triton 3.9 on sm_90 and later, warp-specialise: a producer warp
group loads tiles by TMA while two consumer groups compute (FlashAttention-3's structure). The in-kernel softmax of
the landmark pass, which gathers rows by index beside φ(q) and the window, cannot be either. q and the rows come
through tensor descriptors created in the kernel, which need a global-memory workspace: Triton's allocator is set
to torch's at the first call where none is set. On a CPU Triton's interpreter runs it (tests).
"""
from __future__ import annotations

import functools
import re
from types import ModuleType

import torch

from .tiles import KernelConfig, cdiv, output_like, pow2

#: The oldest Triton whose compiler warp-specialises this kernel's loop on sm_90 (checked offline for sm_90 and
#: sm_100 with 3.9: 4 warps asked become 12, no spills); older ones pipeline it without.
WARP_SPECIALIZE_SINCE = (3, 9)


def _triton() -> ModuleType | None:
    try:
        import triton
    except ImportError:
        return None
    return triton


def _version(text: str) -> tuple[int, int]:
    parts = [int(x) for x in re.findall(r"\d+", text)[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


@functools.lru_cache(maxsize=None)
def warp_specialized(device: torch.device) -> bool:
    """Whether the landmark loop is warp-specialised on `device`: CUDA of compute capability ≥ 9.0 with Triton ≥
    `WARP_SPECIALIZE_SINCE` (never in the interpreter, where it means nothing)."""
    triton = _triton()
    if triton is None or device.type != "cuda":
        return False
    return (torch.cuda.get_device_capability(device)[0] >= 9
            and _version(triton.__version__) >= WARP_SPECIALIZE_SINCE)


def tma_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the TMA-fed landmark softmax cannot serve q (`[B, H, N, D]`), or None: a Triton with tensor
    descriptors, a head size that is a power of two from 16 to 256, and q's rows as a descriptor reads them
    (`tma_rows_ok`)."""
    triton = _triton()
    if triton is None or not hasattr(getattr(triton, "language", None), "make_tensor_descriptor"):
        return "this Triton has no tensor descriptors (tl.make_tensor_descriptor)"
    d = q.shape[-1]
    if not pow2(d) or d > 256:
        return f"head size {d} is not a power of two from 16 to 256"
    if not tma_rows_ok(q):
        return f"q's rows are not 16-byte aligned and contiguous in D (strides {tuple(q.stride())})"
    return None


def tma_rows_ok(q: torch.Tensor) -> bool:
    """Whether a tensor descriptor can read q's rows: contiguous in D, every row and head 16-byte aligned (checked
    at every call, on the host: a plan's later call may bring another view)."""
    es = q.element_size()
    return q.stride(-1) == 1 and not any((s * es) % 16 for s in q.stride()[:3]) and q.data_ptr() % 16 == 0


def _ensure_allocator(device: torch.device) -> None:
    """Triton's allocator for the descriptors' workspace, torch's caching allocator where none is set (Triton keeps
    it per thread context; a CUDA graph capture then takes the workspace from its private pool)."""
    if device.type != "cuda":
        return
    import triton

    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # a Triton that keeps it elsewhere: set ours
        pass
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device=device, dtype=torch.int8))


def tma_landmarks(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, with_lse: bool,
                  config: KernelConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(out, lse)`: out_l over the landmark rows `kc`, `vc` (`[B·H, L, D]`, contiguous, in q's dtype) in a fresh
    buffer laid out as q is (`output_like`), which becomes the layer's output; with `with_lse` each row's
    log-sum-exp `[B, H, N]` (fp32, natural log)."""
    from . import launchers

    bsz, heads, nq, d = q.shape
    out = output_like(q, d)
    lse = torch.empty(bsz, heads, nq, device=q.device, dtype=torch.float32) if with_lse else None
    _ensure_allocator(q.device)
    consts = dict(D=d, BM=config.tma_block_m, BL=config.tma_block, WS=int(warp_specialized(q.device)),
                  LSE=int(with_lse), num_warps=config.tma_warps, num_stages=config.tma_stages)
    launchers.landmark_softmax_pass((cdiv(nq, config.tma_block_m), bsz * heads), q, kc, vc, out, lse, heads,
                                    d ** -0.5 * 1.4426950408889634, consts)
    return out, lse
