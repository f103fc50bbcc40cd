"""What the fused kernels can serve: `fused_unsupported_reasons` for a call, and how a feature map splits between a
cuBLAS prefix and the layers the kernels compute (`phi_split`)."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from .reference import PhiWeights
from .tiles import MAX_REG_WIDTH, pow2


@functools.lru_cache(maxsize=None)
def _triton_import() -> str:
    """'' when triton imports, else why not (imported once: the check runs on every plan build)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return ""


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on `device` (CUDA, or CPU with TRITON_INTERPRET=1)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cpu" and not interpret:
        return False, "CPU tensors (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
    if device.type not in ("cpu", "cuda"):
        return False, f"device {device.type} has no Triton kernels"
    if device.type == "cuda" and interpret:
        return False, "TRITON_INTERPRET=1 with CUDA tensors"
    why = _triton_import()
    return (not why), why


@dataclass(frozen=True)
class PhiSplit:
    """How one feature map splits into a cuBLAS prefix (torch) and the in-kernel rest."""

    prefix: int  # layers run by torch before the kernel (SiLU after each)
    depth: int  # layers run in-kernel: 0, 1 or 2 (0: the kernel reads pre-activations)
    din: int  # input width of the in-kernel part
    h1: int  # hidden width of a 2-layer in-kernel part (else F1)
    f1: int  # output width of the last layer (F, or F/2 for hedgehog)


def phi_split(phi: PhiWeights) -> PhiSplit | str:
    """The split of `phi`, or why the kernels cannot compute it."""
    f1 = int(phi.weights[-1].shape[-1])
    if not pow2(f1) or f1 > MAX_REG_WIDTH:
        return f"feature width {f1} of the last layer is not a power of two in [16, {MAX_REG_WIDTH}]"
    dims = [int(w.shape[-2]) for w in phi.weights]
    depth = min(2, phi.depth)
    if depth == 2 and (not pow2(dims[-1]) or dims[-1] > MAX_REG_WIDTH):
        depth = 1
    if depth >= 1 and dims[phi.depth - depth] % 16:
        depth = 0  # the in-kernel first layer streams its input in chunks of 16, 32 or 64
    prefix = phi.depth - depth
    din = dims[phi.depth - depth] if depth else f1
    h1 = dims[-1] if depth == 2 else f1
    return PhiSplit(prefix=prefix, depth=depth, din=din, h1=h1, f1=f1)


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
    if not pow2(d) or k.shape[-1] != d or v.shape[-1] != d:
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
        split = phi_split(phi)
        if isinstance(split, str):
            reasons.append(f"{name}: {split}")
    if landmark_idx is not None and landmark_idx.dim() != 1:
        reasons.append(f"landmark_idx must be one index set [L] shared by the batch, got {tuple(landmark_idx.shape)}")
    if key_mask is not None and landmark_idx is not None and landmark_idx.numel() > 0:
        reasons.append("a key mask with landmarks (per-batch landmark sets) is served by the PyTorch path")
    if key_mask is not None and window > 0:
        reasons.append("a key mask with a landmark window is served by the PyTorch path")
    return reasons


def joint_unsupported_reasons(combine: str, log_scale: str, n_queries: int, n_keys: int,
                              key_mask: bool) -> list[str]:
    """Why the joint layer's fused call (`joint_plan.JointServePlan`) cannot serve a call beyond what
    `fused_unsupported_reasons` says (empty: it can)."""
    reasons: list[str] = []
    if combine != "shared":
        reasons.append(f"joint combine {combine!r}: only 'shared' has a fused pass (the α blend's far field would "
                       "need the window terms in both adaptive passes)")
    if log_scale != "linear":
        reasons.append(f"joint log_scale {log_scale!r}: the MLP of q is served by the PyTorch path")
    if n_queries != n_keys:
        reasons.append(f"joint layer with {n_queries} queries for {n_keys} keys (the fused call takes the whole "
                       "sequence)")
    if key_mask:
        reasons.append("a key mask on a joint layer (per-batch landmark sets) is served by the PyTorch path")
    return reasons
