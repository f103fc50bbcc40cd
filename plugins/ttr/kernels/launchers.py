"""The Triton launches of a fused ttr call (key pass, query passes, the TMA-fed landmark softmax), their arguments in
the kernels' order.

Everything that does not change from call to call (grids, scalars, compile-time arguments, cast weights) comes
precomputed from a `serve_plan.ServePlan`; a launch reads only the tensors' pointers and strides. triton is
imported at the first launch (`import attnplug` never imports it), and the kernels are looked up in
`triton_ttr` at every launch, so tests can wrap them.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .serve_plan import PhiArgs

_module: ModuleType | None = None

#: Compile options of every launch: multiply-adds fused, as the kernels were tuned (Triton ≤ 3.9's default; 3.9
#: warns that 3.10 turns it off unless asked)
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def _kernels() -> ModuleType:
    global _module
    if _module is None:
        from . import triton_ttr

        _module = triton_ttr
    return _module


@dataclass(frozen=True)
class KeyLaunch:
    """The key pass of one plan: grid `(B·H, key chunks)`, keys per chunk, compile-time arguments."""

    grid: tuple[int, int]
    n: int
    heads: int
    chunk: int
    consts: dict[str, Any]


@dataclass(frozen=True)
class LandmarkRows:
    """The landmark K and V rows that a key pass writes as contiguous rows for its query pass (`KernelConfig.lm_direct`
    = 2): `k` the raw keys (`[B, H, N, D]`, contiguous in D), `slot` int32 `[N]` (each key's row in the buffers, −1:
    none), `kc`, `vc` `[B·H, L_rows, D]` in k's dtype."""

    k: "torch.Tensor"
    slot: "torch.Tensor"
    kc: "torch.Tensor"
    vc: "torch.Tensor"


@dataclass(frozen=True)
class QueryLaunch:
    """One query pass of one plan: grid `(row tiles, B·H)`, its scalar arguments and compile-time arguments."""

    grid: tuple[int, int]
    ints: tuple[int, ...]  # N, L, H, n_cond, n_text_tiles, grid_h, grid_w, L_DIRECT
    floats: tuple[float, ...]  # s_scale, eps, alpha_max, gamma, qk_scale, norm_eps
    logit_h: int
    consts: dict[str, Any]


def key_pass(launch: KeyLaunch, x: "torch.Tensor", v: "torch.Tensor", mask: "torch.Tensor", mask_stride: int,
             s: "torch.Tensor", z: "torch.Tensor", phi: "PhiArgs", pk: "torch.Tensor | None" = None,
             landmark_rows: "LandmarkRows | None" = None, vmax: "torch.Tensor | None" = None) -> None:
    """S and z (fp32, zeroed by the caller: the key chunks add into them) from keys `x` (or their pre-activations
    after a cuBLAS prefix) and values `v`; with `pk` (`[B·H, N, F]`, contiguous; STORE_PK = 1) also φ of every
    key; with `landmark_rows` (STORE_LM = 1) the K and V rows of its slotted keys into its buffers; with `vmax`
    (`[B·H·D]` fp32, zeroed; VMAX = 1) each channel's max |v|."""
    lm = landmark_rows
    k = x if lm is None else lm.k
    consts = launch.consts
    if lm is None and consts.get("STORE_LM"):
        consts = {**consts, "STORE_LM": 0}  # a call whose keys the rows cannot come from (the query pass copies them)
    _kernels()._kv_state_kernel[launch.grid](
        x, v, mask, s, z, s if pk is None else pk, phi.w1, phi.b1, phi.w2, phi.b2,
        k, mask if lm is None else lm.slot, s if lm is None else lm.kc, s if lm is None else lm.vc,
        s if vmax is None else vmax, launch.n, launch.heads, launch.chunk, 0 if lm is None else lm.kc.shape[1],
        x.stride(0), x.stride(1), x.stride(2), v.stride(0), v.stride(1), v.stride(2), mask_stride,
        0 if pk is None else pk.stride(0), k.stride(0), k.stride(1), k.stride(2), *phi.head_strides, phi.norm_eps,
        **consts, **COMPILE_OPTIONS)


def query_pass(launch: QueryLaunch, q: "torch.Tensor", x: "torch.Tensor", s_q: "torch.Tensor", z: "torch.Tensor",
               kl: "torch.Tensor", vl: "torch.Tensor", idx: "torch.Tensor", lm_flag: "torch.Tensor",
               out: "torch.Tensor", d_buf: "torch.Tensor", d_sum: "torch.Tensor", lse: "torch.Tensor",
               logit: "torch.Tensor", aff: "torch.Tensor", phi: "PhiArgs", flag: "torch.Tensor",
               pk: "torch.Tensor | None" = None, bq: "torch.Tensor | None" = None,
               kc: "torch.Tensor | None" = None, vc: "torch.Tensor | None" = None,
               vmax: "torch.Tensor | None" = None) -> None:
    """One pass of the query kernel over its query rows (see `triton_ttr._query_kernel` for its modes); the joint
    pass (mode 5) also reads φ of every key `pk` (`[B·H, N, F]`, contiguous) and the log-scale's `b_h` (`bq`,
    `[H, D]` fp32); `kc`, `vc`: the landmarks after the directly loaded ones, copied contiguous (`LM_DIRECT` = 2);
    `vmax`: the key pass's max |v| per channel (FP8)."""
    _kernels()._query_kernel[launch.grid](
        q, x, s_q, z, kl, vl, idx, lm_flag, out, d_buf, d_sum, lse, logit, aff,
        phi.w1, phi.b1, phi.w2, phi.b2, flag, flag if pk is None else pk, flag if bq is None else bq,
        flag if kc is None else kc, flag if vc is None else vc, flag if vmax is None else vmax,
        *launch.ints, *launch.floats,
        q.stride(0), q.stride(1), q.stride(2), x.stride(0), x.stride(1), x.stride(2),
        kl.stride(0), kl.stride(1), kl.stride(2), vl.stride(0), vl.stride(1), vl.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *phi.head_strides, launch.logit_h, 0 if pk is None else pk.stride(0), **launch.consts,
        **COMPILE_OPTIONS)


def landmark_softmax_pass(grid: tuple[int, int], q: "torch.Tensor", kc: "torch.Tensor", vc: "torch.Tensor",
                          out: "torch.Tensor", lse: "torch.Tensor | None", heads: int, qk_scale: float,
                          consts: dict[str, Any]) -> None:
    """out_l over the contiguous landmark rows `kc`, `vc` (`[B·H, L, D]`) into `out`, with `lse` (`[B, H, N]` fp32,
    contiguous) each row's log-sum-exp (`triton_ttr._landmark_softmax_kernel`, kernels/tma_landmarks.py)."""
    _kernels()._landmark_softmax_kernel[grid](
        q, kc, vc, out, out if lse is None else lse, q.shape[2], kc.shape[1], heads,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2), qk_scale, **consts,
        **COMPILE_OPTIONS)
