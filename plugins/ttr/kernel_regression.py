"""Kernel-regression attention in plain PyTorch: the readable reference of the ttr branch.

    out_i = φ(q_i)·S / (φ(q_i)·z + ε),   S = Σ_j φ(k_j) v_jᵀ,   z = Σ_j φ(k_j)

(a Nadaraya–Watson estimator with the positive kernel κ(q, k) = φ(q)·φ(k)). S and z are
accumulated in fp32 over key chunks; queries are processed in chunks. Fused Triton kernels
(plugins/ttr/kernels) are tested against these functions, so they stay small and explicit.

Shapes: B batch, H heads, N tokens, D head dim, Dv value dim, F feature dim, G = 1 (feature map
shared across heads) or H (one per head).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = ("elu+1", "hedgehog", "relu")


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """Positive features from the last linear layer's output `[..., F']`.

    `elu+1`: ELU(x) + 1 (F' = F). `relu`: max(x, 0) (F' = F; may be all zero, then ε decides).
    `hedgehog`: softmax(x) ⊕ softmax(−x) over the feature axis (F' = F / 2, output F).
    """
    if activation == "elu+1":
        # = F.elu(x) + 1, written out: F.elu's backward breaks torch.compile's AOT autograd (torch 2.13)
        return torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0.0)))
    if activation == "relu":
        return F.relu(x)
    if activation == "hedgehog":
        return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)
    raise ValueError(f"unknown feature-map activation {activation!r}; expected one of {ACTIVATIONS}")


def feature_map(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                activation: str = "elu+1", l2_norm: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """φ(x): an MLP (SiLU between layers), a positive activation, optional L2 normalization — the one PyTorch φ
    (the layer's `FeatureMapNet`, the kernels' reference `phi_reference` and so the fused kernels' tests use it).

    :param x: `[B, H, N, D]`; φ is computed in its dtype (cast x to fp32 first for fp32 features).
    :param weights: per layer `[G, in, out]` (G = 1: shared across heads, G = H: one map per head) or `[in, out]`
        (shared); the first `in` is D, the last `out` is F (F/2 for hedgehog).
    :param biases: per layer `[G, out]`, `[out]` or None.
    :return: `[B, H, N, F]` in the dtype of `x`.
    """
    h = x
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases)):
        w = w.to(h.dtype)
        if w.dim() == 2 or w.shape[0] == 1:  # shared across heads: one plain matmul
            h = torch.matmul(h, w if w.dim() == 2 else w[0])
            if b is not None:
                h = h + (b if b.dim() == 1 else b[0]).to(h.dtype)
        else:  # one map per head: [B, H, N, in] @ [H, in, out] broadcasts over B
            h = torch.matmul(h, w)
            if b is not None:
                h = h + b.to(h.dtype)[:, None, :]
        if i < last:
            h = F.silu(h)
    h = activate(h, activation)
    if l2_norm:
        h = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(eps)
    return h


def kv_state(phi_k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
             chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """S = Σ_j φ(k_j) v_jᵀ and z = Σ_j φ(k_j), accumulated in fp32 over key chunks.

    :param phi_k: `[B, H, Nk, F]`.
    :param v: `[B, H, Nk, Dv]`.
    :param mask: `[B, Nk]` bool, True = valid key; padded keys contribute nothing (φ and v zeroed).
    :return: `S [B, H, F, Dv]` fp32 and `z [B, H, F]` fp32.
    """
    b, h, n, f = phi_k.shape
    s = phi_k.new_zeros(b, h, f, v.shape[-1], dtype=torch.float32)
    z = phi_k.new_zeros(b, h, f, dtype=torch.float32)
    for start in range(0, n, chunk):
        pk, vc = key_chunk(phi_k[:, :, start:start + chunk].float(), v[:, :, start:start + chunk].float(),
                           None if mask is None else mask[:, start:start + chunk])
        s = s + torch.einsum("bhnf,bhnd->bhfd", pk, vc)
        z = z + pk.sum(dim=2)
    return s, z


def key_chunk(phi_k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero φ(k) and v of padded keys in one chunk (`mask [B, n]` True = valid)."""
    if mask is None:
        return phi_k, v
    keep = mask.to(device=phi_k.device, dtype=phi_k.dtype)[:, None, :, None]
    return phi_k * keep, v * keep.to(v.dtype)


def query_pass(phi_q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, eps: float = 1e-6,
               chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """out = φ(q)·S / (φ(q)·z + ε) in fp32, chunked over queries.

    :param phi_q: `[B, H, Nq, F]`.
    :param s: `[B, H, F, Dv]` fp32, from `kv_state`.
    :param z: `[B, H, F]` fp32.
    :return: `out [B, H, Nq, Dv]` fp32 and `den [B, H, Nq]` fp32 (the denominators before ε).
    """
    outs, dens = [], []
    for start in range(0, phi_q.shape[2], chunk):
        pq = phi_q[:, :, start:start + chunk].float()
        num = torch.matmul(pq, s)
        den = torch.matmul(pq, z.unsqueeze(-1)).squeeze(-1)
        outs.append(num / (den + eps).unsqueeze(-1))
        dens.append(den)
    if not outs:
        return phi_q.new_zeros(*phi_q.shape[:-1], s.shape[-1], dtype=torch.float32), \
            phi_q.new_zeros(phi_q.shape[:-1], dtype=torch.float32)
    return torch.cat(outs, dim=2), torch.cat(dens, dim=2)


def key_state(k: torch.Tensor, v: torch.Tensor, phi_k: Callable[[torch.Tensor], torch.Tensor],
              q_for_width: torch.Tensor, phi_q: Callable[[torch.Tensor], torch.Tensor],
              mask: torch.Tensor | None = None, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """S and z over every key, φ applied one key chunk at a time (`kv_state` per chunk).

    :param q_for_width, phi_q: only to size S and z when there are no keys at all.
    :return: `S [B, H, F, Dv]` and `z [B, H, F]`, fp32.
    """
    s: torch.Tensor | None = None
    z: torch.Tensor | None = None
    for start in range(0, k.shape[2], chunk):
        m = None if mask is None else mask[:, start:start + chunk]
        s_c, z_c = kv_state(phi_k(k[:, :, start:start + chunk]), v[:, :, start:start + chunk], m, chunk)
        s = s_c if s is None else s + s_c
        z = z_c if z is None else z + z_c
    if s is None or z is None:  # no keys at all
        b, h = q_for_width.shape[:2]
        f = phi_q(q_for_width[:, :, :0]).shape[-1]
        s = q_for_width.new_zeros(b, h, f, v.shape[-1], dtype=torch.float32)
        z = q_for_width.new_zeros(b, h, f, dtype=torch.float32)
    return s, z


def queries(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, phi_q: Callable[[torch.Tensor], torch.Tensor],
            eps: float = 1e-6, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`query_pass` over every query, φ applied one query chunk at a time: `out [B, H, Nq, Dv]`, `den [B, H, Nq]`."""
    outs, dens = [], []
    for start in range(0, q.shape[2], chunk):
        o, d = query_pass(phi_q(q[:, :, start:start + chunk]), s, z, eps, chunk)
        outs.append(o)
        dens.append(d)
    if not outs:
        b, h = q.shape[:2]
        return q.new_zeros(b, h, 0, s.shape[-1], dtype=torch.float32), q.new_zeros(b, h, 0, dtype=torch.float32)
    return torch.cat(outs, dim=2), torch.cat(dens, dim=2)


def kernel_regression(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      phi_q: Callable[[torch.Tensor], torch.Tensor], phi_k: Callable[[torch.Tensor], torch.Tensor],
                      mask: torch.Tensor | None = None, eps: float = 1e-6, key_chunk_size: int = 1024,
                      query_chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming kernel regression: φ is applied chunk by chunk, so no `[B, H, N, F]` tensor of all
    tokens is ever held (inference memory is O(chunk · (hidden + F)) plus S and z).

    :param q: `[B, H, Nq, D]`; :param k: `[B, H, Nk, D]`; :param v: `[B, H, Nk, Dv]`.
    :param phi_q, phi_k: feature maps `[B, H, n, D] -> [B, H, n, F]` (applied to chunks).
    :param mask: `[B, Nk]` bool key padding (True = valid) or None.
    :return: `out [B, H, Nq, Dv]` fp32 and `den [B, H, Nq]` fp32.
    """
    s, z = key_state(k, v, phi_k, q, phi_q, mask, key_chunk_size)
    return queries(q, s, z, phi_q, eps, query_chunk_size)
