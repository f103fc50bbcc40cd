"""FP8 (e4m3) for the exact softmax of the residual branch: the rounding the fused kernels compute, emulated here.

With `[plugins.landmark] precision = "fp8"` the exact branch (the landmark softmax and the local window) runs its
two products in e4m3, SageAttention-style, with scales chosen so that no tile boundary changes the result:

- scores `q·kᵀ`: q and k rounded with one scale per token (its largest |value| maps to 448, e4m3's largest);
  the products are exact in fp32 and the scales multiply the score back;
- values `P·V`: V rounded with one scale per channel over every key of the (batch, head) (the key pass, which reads
  every value anyway, takes that maximum), the probabilities P = exp(s − running max) ∈ (0, 1] times 448; the
  sum of P that normalises the row stays in fp32.

The PyTorch path rounds the same tensors the same way and computes in fp32 (the kernels' products are exact and
accumulate in fp32 too), so a quality study of FP8 runs on any device. The probabilities here are taken against
the row's final maximum, the kernels' against the running one: one e4m3 rounding of each either way.
"""
from __future__ import annotations

import torch

#: e4m3's largest finite value
E4M3_MAX = 448.0


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to e4m3 (round to nearest even, values beyond ±448 saturate), in fp32."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def round_rows(x: torch.Tensor) -> torch.Tensor:
    """`x [..., D]` rounded to e4m3 with one scale per row (its max |x| / 448), back in fp32 at its own scale."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return round_e4m3(x.float() / scale) * scale


def value_scale(v: torch.Tensor) -> torch.Tensor:
    """One scale per channel of `v [B, H, N, D]` over its N keys (max |v| / 448): `[B, H, 1, D]` fp32."""
    return v.float().abs().amax(-2, keepdim=True).clamp_min(1e-12) / E4M3_MAX


def round_values(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`v [B, H, ..., N, D]` rounded to e4m3 at `scale` (`value_scale` of the keys it comes from, broadcast over
    the middle dims), in fp32 at its own scale."""
    while scale.dim() < v.dim():
        scale = scale.unsqueeze(2)
    return round_e4m3(v.float() / scale) * scale


def round_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v as the exact softmax's e4m3 products read them, in fp32: q and k per row, v at `v_scale` (default:
    `value_scale(v)`, for a `v` that holds every key)."""
    return round_rows(q), round_rows(k), round_values(v, value_scale(v) if v_scale is None else v_scale)


def rounded_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim whose probabilities are rounded as the kernels' P·V reads them: p = exp(s − max)
    rounded to e4m3 at 448, divided by the unrounded sum. A row with no finite logit gives zeros."""
    top = logits.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(logits - top)
    total = p.sum(-1, keepdim=True)
    return round_e4m3(p * E4M3_MAX) / E4M3_MAX / torch.where(total > 0, total, torch.ones_like(total))


def fp8_unsupported_reason(device: torch.device) -> str:
    """Why the fused kernels cannot compute e4m3 products on `device` ('' where they can: CUDA GPUs of compute
    capability 8.9 or newer, and the CPU's Triton interpreter)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"compute capability {major}.{minor} has no FP8 tensor cores (8.9 or newer needed)"
    return ""
