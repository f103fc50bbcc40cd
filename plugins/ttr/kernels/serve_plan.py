"""`ServePlan`: everything a fused ttr call needs that does not depend on the values of q, k and v, built once.

A plan is built from the layer's feature maps, its blend (α logit, α_max, γ, the running reference of d), the
call's dtype, device and shapes and the landmark / window settings: the weights cast to the kernels' dtypes, the
landmark indices and per-key landmark flags, the landmark-softmax path, each launch's grid, scalars and
compile-time arguments. A call then allocates its buffers and launches — the key pass (S, z), S scaled and cast
for the query passes, cuDNN's or the TMA-fed kernel's landmark softmax where chosen, one query pass (two for adaptive α against the call's
own mean of d) — with no host↔device copy and no device sync. The ttr backend caches plans on each layer and
builds new ones when its weights change; `fused.ttr_forward_fused` builds one per call.

Tensors a plan holds (cast weights, α logit, d's reference) are read by the kernels at every call: a tensor given
in the kernels' dtype is used as is, so in-place changes to it are seen; casts are copies made at build.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from . import launchers
from .capability import PhiSplit, phi_split
from .cudnn_landmarks import choose_landmark_impl, sdpa_landmarks
from .reference import PhiWeights
from .tiles import (KernelConfig, active_config, block_k, cdiv, direct_rows, hidden_chunk, num_sms, output_like,
                    patch_width, query_hidden_chunk, window_block)
from .tma_landmarks import tma_landmarks, tma_rows_ok

log = logging.getLogger("attnplug")

_ACT = {"elu+1": 0, "relu": 1, "hedgehog": 0}


def on_device(x: torch.Tensor | float | Sequence[float], device: torch.device) -> torch.Tensor:
    """`x` as fp32 on `device` without a device sync: Python numbers are copied with `non_blocking` (a blocking
    copy from CPU memory waits for everything queued on the GPU first)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.tensor(x, dtype=torch.float32).to(device, non_blocking=True)


def _cast(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype).contiguous()


@dataclass(frozen=True)
class PhiArgs:
    """One feature map as the kernels read it: the layers before the in-kernel part (run on cuBLAS, in the input
    dtype) and the in-kernel layers' weights (input dtype) and biases (fp32), with per-head strides and flags."""

    split: PhiSplit
    activation: str
    l2_norm: bool
    norm_eps: float
    prefix: tuple[tuple[torch.Tensor, torch.Tensor | None, bool], ...]  # (weight, bias, SiLU after) per layer
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    head_strides: tuple[int, int, int, int]  # elements between heads of w1, b1, w2, b2 (0: shared)
    has_b1: int
    has_b2: int

    @classmethod
    def build(cls, phi: PhiWeights, dtype: torch.dtype, device: torch.device, dummy: torch.Tensor) -> "PhiArgs":
        split = phi_split(phi)
        if isinstance(split, str):
            raise ValueError(f"the fused kernels cannot compute this feature map: {split}")
        prefix = tuple((_cast(phi.weights[i], dtype, device),
                        None if phi.biases[i] is None else _cast(phi.biases[i], dtype, device), i < phi.depth - 1)
                       for i in range(split.prefix))
        layers = range(phi.depth - split.depth, phi.depth)
        ws = [_cast(phi.weights[i], dtype, device) for i in layers]
        bs = [None if phi.biases[i] is None else _cast(phi.biases[i], torch.float32, device) for i in layers]
        w1 = ws[0] if len(ws) >= 1 else dummy
        b1 = bs[0] if len(bs) >= 1 and bs[0] is not None else dummy
        w2 = ws[1] if len(ws) == 2 else dummy
        b2 = bs[1] if len(bs) == 2 and bs[1] is not None else dummy

        def per_head(t: torch.Tensor) -> int:
            return t[0].numel() if phi.per_head and t is not dummy else 0

        return cls(split, phi.activation, phi.l2_norm, phi.norm_eps, prefix, w1, b1, w2, b2,
                   (per_head(w1), per_head(b1), per_head(w2), per_head(b2)),
                   int(len(bs) >= 1 and bs[0] is not None), int(len(bs) == 2 and bs[1] is not None))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """The layers before the in-kernel part (x unchanged when there are none), contiguous in the last dim."""
        for w, b, silu in self.prefix:
            x = torch.matmul(x, w)  # [B,H,N,Din] @ [Din,Dout] or [H,Din,Dout] (broadcast over B)
            if b is not None:
                x = x + (b if b.dim() == 1 else b[:, None, :])
            if silu:
                x = F.silu(x)
        return x if x.stride(-1) == 1 else x.contiguous()

    def consts(self, fast_silu: int) -> dict[str, Any]:
        """The compile-time arguments both kernels share."""
        s = self.split
        return dict(DIN=s.din, H1=s.h1, F1=s.f1, DEPTH=s.depth, ACT=_ACT[self.activation],
                    IS_HH=int(self.activation == "hedgehog"), HAS_B1=self.has_b1, HAS_B2=self.has_b2,
                    NORM=int(self.l2_norm), FAST_SILU=fast_silu)


class ServePlan:
    """The fused call of one layer at one shape; `plan(q, k, v, ...)` runs it (see the module docstring).

    :param q, k, v: tensors of the shapes, dtype and device the plan serves (their values are not read).
    :param landmark_idx: `[L]` key indices of the landmarks (None or empty: none).
    :param alpha_logit: a scalar or per-head `[H]` blend logit. :param d_reference: `[H]` running mean of d (adaptive
        α in one pass) or None (the call's own mean: two passes).
    :param key_mask: whether calls come with a `[B, Nk]` key-padding mask (kernel-only plans).
    :param window, grid, n_cond: the landmark window (checked by the caller, `reference.check_window`).
    :param landmark_flags: `[Nk]` int8, 1 for landmarks (built from `landmark_idx` when None and a window runs).
    :param landmark_prefix: how many leading landmarks are the key rows 0 … n−1 in order (the caller's word: a
        `ResidualBranch`'s indices begin with the call's conditioning tokens); None counts them from `landmark_idx`
        when it is on the CPU, and takes 0 (every row gathered) for device indices — reading them would sync.
    :param exact_fp8: the landmark softmax and the window in e4m3 (`[plugins.landmark] precision = "fp8"`,
        core/exact_fp8.py; the caller checks the GPU, `fp8_unsupported_reason`).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: PhiWeights, phi_k: PhiWeights, *,
                 landmark_idx: torch.Tensor | None = None, alpha_logit: torch.Tensor | float = -2.1972,
                 alpha_max: float = 0.2, gamma: float = 2.0, adaptive: bool = True, eps: float = 1e-6,
                 key_mask: bool = False, landmark_impl: str = "auto", config: KernelConfig | None = None,
                 window: int = 0, grid: tuple[int, int] | None = None, n_cond: int = 0,
                 d_reference: torch.Tensor | None = None, landmark_flags: torch.Tensor | None = None,
                 landmark_prefix: int | None = None, exact_fp8: bool = False) -> None:
        cfg = config or active_config()
        self.config = cfg
        bsz, heads, nq, d = q.shape
        nk = k.shape[2]
        dev, dtype = q.device, q.dtype
        self.shape = (bsz, heads, nq, nk, d)
        self.dtype, self.device = dtype, dev
        self.dummy = torch.zeros(1, device=dev, dtype=torch.float32)  # stands in for pointers a pass does not read
        self.phi_q = PhiArgs.build(phi_q, dtype, dev, self.dummy)
        self.phi_k = self.phi_q if phi_k is phi_q else PhiArgs.build(phi_k, dtype, dev, self.dummy)
        self.fast_silu = int(dev.type == "cuda" and dtype in (torch.float16, torch.bfloat16))
        self.ft = phi_k.feature_dim
        self.n_s = bsz * heads * self.ft * d  # S and z share one zeroed buffer: S first, then z
        self.n_sz = self.n_s + bsz * heads * self.ft
        self.s_scale = 1.0 / max(1, nk)  # keeps S and z in range for fp16 dots; cancels in the ratio
        self.key_mask = key_mask
        self.store_phi_k = False  # the joint plan's key pass also writes φ(k) (`joint_plan`)
        self.bq: torch.Tensor | None = None  # the joint plan's log-scale b_h `[H, D]`, read by its query pass

        use_lm = landmark_idx is not None and landmark_idx.numel() > 0
        self.n_lm = int(landmark_idx.numel()) if use_lm else 0
        self.idx = landmark_idx.to(device=dev, dtype=torch.long).contiguous() if use_lm else self.dummy
        # the in-kernel landmark softmax loads the leading landmarks that are key rows 0 … n−1 as they lie
        # (`KernelConfig.lm_direct`); with 2, the others (`idx_rest`) from contiguous rows (`landmark_rows`)
        self.n_direct = direct_rows(landmark_idx, landmark_prefix) if use_lm and cfg.lm_direct else 0
        self.idx_rest = self.idx[self.n_direct:] if self.n_direct and cfg.lm_direct == 2 else None
        self.window = int(window)
        self.n_cond = int(n_cond) if window else 0
        self.grid_hw = (1, 1) if window == 0 else (int(grid[0]), int(grid[1]))  # type: ignore[index]
        self.landmark_lse = self.window > 0  # cuDNN's landmark softmax also gives its log-sum-exp (a window: yes)
        self.lm_flag = self.dummy
        if window > 0:  # int8 per key: 1 = a landmark (the window part skips it: the landmark loop counted it)
            if landmark_flags is None:
                landmark_flags = torch.zeros(nk, dtype=torch.int8, device=dev)
                if use_lm:
                    landmark_flags.index_fill_(0, self.idx, 1)
            self.lm_flag = landmark_flags
        self.use_branch = use_lm or window > 0  # a window runs the landmark branch even without landmarks
        self.landmark_impl = choose_landmark_impl(landmark_impl, q, self.n_lm, self.window)
        # the exact softmax's products in e4m3 (FP8 1; 2 in the interpreter): the kernels' own softmax (cuDNN's has
        # no e4m3 path here), the values' scales from the key pass's max |v|, after z in the state's buffer
        self.fp8 = (1 if dev.type == "cuda" else 2) if exact_fp8 and self.use_branch else 0
        if self.fp8:
            self.landmark_impl = "fused"
        self.n_vm = self.n_sz
        self.n_sz += bsz * heads * d if self.fp8 else 0
        # the landmark rows the key pass writes contiguous as it reads every key (each key's row there: `lm_slot`, −1
        # for none): every landmark for the TMA-fed softmax, those after the directly loaded ones for the kernels' own
        # softmax with lm_direct 2
        self.row_idx = self.idx if self.landmark_impl == "tma" else (
            self.idx_rest if self.landmark_impl != "sdpa" else None)
        self.lm_slot: torch.Tensor | None = None
        if self.row_idx is not None and self.row_idx.numel():
            self.lm_slot = torch.full((nk,), -1, dtype=torch.int32, device=dev)
            self.lm_slot[self.row_idx] = torch.arange(self.row_idx.numel(), dtype=torch.int32, device=dev)
        self.key = self._key_launch(cfg, bsz, heads, nk, d)

        logit = on_device(alpha_logit, dev).reshape(-1).contiguous()
        if logit.numel() not in (1, heads):
            raise ValueError(f"alpha_logit: expected a scalar or [{heads}] per head, got {logit.numel()} values")
        self.logit, self.logit_h = logit, int(logit.numel() == heads)
        self.alpha_max, self.gamma, self.eps = float(alpha_max), float(gamma), float(eps)
        self.adaptive = bool(adaptive)
        self.one_pass = self.use_branch and self.adaptive and d_reference is not None
        self.d_ref = self.dummy
        if self.one_pass:
            assert d_reference is not None
            d_ref = d_reference.reshape(-1)
            if d_ref.numel() != heads:
                raise ValueError(f"d_reference: expected [{heads}] (one mean of d per head), got "
                                 f"{tuple(d_reference.shape)}")
            # read by the kernel as the per-head mean of d (no copy when it is the layer's fp32 buffer on q's device)
            self.d_ref = d_ref.to(device=dev, dtype=torch.float32).contiguous()
        if not self.use_branch:
            self.modes: tuple[int, ...] = (0,)
        elif self.one_pass:
            self.modes = (4,)
        else:
            self.modes = (2, 3) if self.adaptive else (1,)
        self._launches: dict[tuple[int, int, int, int], launchers.QueryLaunch] = {}

    # ---- launch descriptions (memoised: LM_SRC follows cuDNN's result, GUARD and HAS_AFF the call) -------------
    def _key_launch(self, cfg: KernelConfig, bsz: int, heads: int, n: int, d: int) -> launchers.KeyLaunch:
        bn = cfg.kv_block_n
        n_chunks = max(1, min(cdiv(n, bn), cdiv(cfg.kv_programs_per_sm * num_sms(self.device), bsz * heads)))
        chunk = cdiv(cdiv(n, n_chunks), bn) * bn
        consts = dict(D=d, BK=block_k(cfg.block_k, self.phi_k.split.din), **self.phi_k.consts(self.fast_silu),
                      HAS_MASK=int(self.key_mask), BN=bn, HC=hidden_chunk(cfg.kv_hidden_chunk, self.phi_k.split.h1),
                      STORE_PK=int(self.store_phi_k), STORE_LM=int(self.lm_slot is not None), VMAX=int(self.fp8 > 0),
                      num_warps=cfg.kv_warps, num_stages=cfg.kv_stages)
        return launchers.KeyLaunch((bsz * heads, cdiv(n, chunk)), n, heads, chunk, consts)

    def query_launch(self, mode: int, lm_src: int, guard: int, has_aff: int) -> launchers.QueryLaunch:
        """The query pass of `mode`: the landmark pass (modes 1, 2, 4) has its own tiles (from cuDNN's softmax,
        `lm_src` = 1: sdpa_lm_*), the joint pass (5) joint_*; kernel-only (0) and adaptive pass 2 (3) share q_*."""
        key = (mode, lm_src, guard, has_aff)
        hit = self._launches.get(key)
        if hit is not None:
            return hit
        cfg = self.config
        bsz, heads, nq, _, d = self.shape
        landmark_pass = mode in (1, 2, 4, 5)
        lm_block, win_block = cfg.lm_block, cfg.lm_window_block
        if mode == 5:
            bm, warps, stages = cfg.joint_block_m, cfg.joint_warps, cfg.lm_stages
            lm_block, win_block = cfg.joint_lm_block, cfg.joint_window_block
        elif landmark_pass and lm_src:
            bm, warps, stages, win_block = cfg.sdpa_lm_block_m, cfg.sdpa_lm_warps, cfg.lm_stages, cfg.sdpa_lm_window_block
        elif landmark_pass:
            bm, warps, stages = cfg.lm_block_m, cfg.lm_warps, cfg.lm_stages
        else:
            bm, warps, stages = cfg.q_block_m, cfg.q_warps, cfg.q_stages
        grid_h, grid_w = self.grid_hw
        win = self.window if landmark_pass else 0
        pw = patch_width(cfg.lm_patch_w, grid_w, bm) if win else 0
        # the joint pass skips the conditioning rows (SDPA gives them): no text tiles, and rows from n_cond on
        n_text_tiles = cdiv(self.n_cond, bm) if win and mode != 5 else 0
        # with a window: the conditioning rows, then (BM/PW x PW) patches of the latent grid
        if win:
            tiles = n_text_tiles + cdiv(grid_h, bm // pw) * cdiv(grid_w, pw)
        else:
            tiles = cdiv(nq - (self.n_cond if mode == 5 else 0), bm)
        split = self.phi_q.split
        consts = dict(D=d, BK=block_k(cfg.block_k, split.din), **self.phi_q.consts(self.fast_silu), MODE=mode,
                      LM_SRC=lm_src, HAS_AFF=has_aff, BM=bm, BL=lm_block,
                      HC=query_hidden_chunk(cfg, split.din, split.h1, landmark_pass, mode), WIN=win,
                      BLW=window_block(win_block, bm, pw, win) if win else 16, PW=pw,
                      GUARD=guard if mode != 2 else 0, LM_DIRECT=self.lm_direct(mode, lm_src),
                      FP8=self.fp8 if landmark_pass else 0, num_warps=warps, num_stages=stages)
        qk_scale = d ** -0.5 * 1.4426950408889634
        hit = launchers.QueryLaunch(
            (tiles, bsz * heads), (nq, self.n_lm, heads, self.n_cond, n_text_tiles, grid_h, grid_w,
                                   self.n_direct if consts["LM_DIRECT"] else 0),
            (self.s_scale, self.eps, self.alpha_max, self.gamma, qk_scale, self.phi_q.norm_eps), self.logit_h, consts)
        self._launches[key] = hit
        return hit

    def lm_direct(self, mode: int, lm_src: int) -> int:
        """`LM_DIRECT` of a query pass: the config's `lm_direct` where this pass runs the in-kernel landmark softmax
        over landmarks that begin with key rows 0 … n−1, else 0."""
        in_kernel_softmax = mode in (1, 2, 4, 5) and not lm_src
        return self.config.lm_direct if in_kernel_softmax and self.n_direct else 0

    # ---- a call -------------------------------------------------------------------------------------------------
    def key_state(self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                  phi_k_out: torch.Tensor | None = None,
                  landmark_rows: launchers.LandmarkRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The key pass: `(sz, z)`, S `[B·H·F·D]` and then z `[B·H·F]` in one flat fp32 buffer, and z's view;
        with `phi_k_out` (a plan built with `store_phi_k`) also φ of every key into it, with `landmark_rows` (from
        `landmark_rows(k)`) the landmark rows the query pass reads contiguous."""
        if (key_mask is not None) != self.key_mask:
            raise ValueError("ServePlan: this plan was built " + ("with" if self.key_mask else "without")
                             + " a key mask; the call " + ("has none" if key_mask is None else "has one"))
        x = self.phi_k.pre(k)
        if v.stride(-1) != 1:
            v = v.contiguous()
        sz = torch.zeros(self.n_sz, device=k.device, dtype=torch.float32)  # the key chunks add into it atomically
        z = sz[self.n_s:self.n_vm]
        if key_mask is not None:
            m = key_mask.to(device=k.device, dtype=torch.int8).contiguous()
            mask, smb = m, (m.stride(0) if m.shape[0] > 1 else 0)  # [1, Nk]: one mask for the batch
        else:
            mask, smb = self.dummy, 0
        launchers.key_pass(self.key, x, v, mask, smb, sz, z, self.phi_k, phi_k_out, landmark_rows,
                           vmax=self.value_max(sz))
        return sz, z

    def value_max(self, sz: torch.Tensor) -> torch.Tensor | None:
        """The key pass's max |v| per channel `[B·H·D]` in the state buffer `sz` (FP8 plans), else None."""
        return sz[self.n_vm:] if self.fp8 else None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                 branch_affine: torch.Tensor | None = None, finite_flag: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, H, Nq, D]` in q's dtype. `branch_affine`: `[B, 4]` fp32 contiguous on q's device, or None;
        `finite_flag`: a one-element int32 device tensor — rows not finite are then replaced by the landmark
        branch's row (kernel-only: zeros) and the flag is set to 1 (no sync)."""
        with torch.no_grad():
            rows = self.landmark_rows(k)
            sz, z = self.key_state(k, v, key_mask, landmark_rows=rows)
            s_q = self.scaled_state(sz, q.dtype)
            vmax = self.value_max(sz)
            del sz  # the fp32 S is not read again (z and vmax, its tail, are: the views keep it)
            return self.query(q, k, v, s_q, z, branch_affine, finite_flag, landmark_rows=rows, value_max=vmax)

    def landmark_rows(self, k: torch.Tensor) -> launchers.LandmarkRows | None:
        """This call's buffers for the landmark rows the key pass writes (`lm_slot`), or None: the plan has none to
        write, or k is not contiguous in its last dim (the query pass then copies them)."""
        if self.lm_slot is None or k.stride(-1) != 1:
            return None
        bsz, heads, _, _, d = self.shape
        assert self.row_idx is not None
        rows = (bsz * heads, self.row_idx.numel(), d)
        return launchers.LandmarkRows(k, self.lm_slot, k.new_empty(rows), k.new_empty(rows))

    # ---- the pieces of a call (also run by `joint_plan.JointServePlan` and `parallel_fused.ShardedPlan`) -------
    def scaled_state(self, sz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """S as the query passes' dot reads it: scaled by `s_scale` and in `dtype`, once per call, not per tile."""
        s_q = torch.empty(self.n_s, device=sz.device, dtype=dtype)
        torch.mul(sz[:self.n_s], self.s_scale, out=s_q)
        return s_q

    def query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s_q: torch.Tensor, z: torch.Tensor,
              branch_affine: torch.Tensor | None = None, finite_flag: torch.Tensor | None = None,
              mean_of_d: "Callable[[torch.Tensor, torch.Tensor], None] | None" = None,
              phi_k_all: torch.Tensor | None = None,
              landmark_rows: launchers.LandmarkRows | None = None,
              value_max: torch.Tensor | None = None) -> torch.Tensor:
        """The query passes with the state given (`scaled_state`'s S, fp32 z): `[B, H, Nq, D]` in q's dtype.
        `k, v` are the keys the landmark branch reads (landmark rows at `landmark_idx`, the window's image keys).
        `mean_of_d(d, d_sum)`, adaptive α against the call's own mean of d only: called between the two passes
        with pass 1's d `[B, H, Nq]` and its per-(b, h) sums `[B·H]`, which it may rewrite in place (pass 2 divides
        them by Nq) — a sequence-parallel call sums over every rank there. `phi_k_all`: φ of every key, as the
        joint pass reads it (`key_state`'s `phi_k_out`). `landmark_rows`: what this call's key pass wrote
        (`LM_DIRECT` = 2); without them that pass copies the rows itself. `value_max`: `value_max` of the key pass's
        state (FP8 plans: the values' per-channel scales)."""
        if self.fp8 and value_max is None:
            raise ValueError("ServePlan: an FP8 plan's query passes need the key pass's value_max")
        with torch.no_grad():
            q, x, kl, vl = self.query_inputs(q, k, v)
            out, lse, lm_src = self.landmark_output(q, kl, vl, landmark_rows)
            if self.row_idx is not self.idx_rest:
                landmark_rows = None  # every landmark's rows (the TMA-fed softmax's): not what LM_DIRECT 2 reads
            d_buf, d_sum = self.dummy, self.d_ref
            if self.modes == (2, 3):
                bsz, heads, nq = self.shape[:3]
                d_buf = torch.empty(bsz, heads, nq, device=q.device, dtype=torch.float32)
                d_sum = torch.zeros(bsz * heads, device=q.device, dtype=torch.float32)  # pass 1 adds into it
            guard = int(finite_flag is not None)
            flag = finite_flag if finite_flag is not None else self.dummy
            has_aff = int(branch_affine is not None)
            aff = branch_affine if branch_affine is not None else self.dummy
            kc, vc = (None, None) if landmark_rows is None else (landmark_rows.kc, landmark_rows.vc)
            for mode in self.modes:
                if mode == 3 and mean_of_d is not None:
                    mean_of_d(d_buf, d_sum)
                launch = self.query_launch(mode, lm_src if mode != 3 else 0, guard, has_aff)
                if launch.consts["LM_DIRECT"] == 2 and kc is None:
                    kc, vc = (t.index_select(2, self.idx_rest).contiguous() for t in (kl, vl))
                launchers.query_pass(launch, q, x, s_q, z, kl, vl, self.idx, self.lm_flag, out, d_buf, d_sum, lse,
                                     self.logit, aff, self.phi_q, flag, phi_k_all, self.bq, kc, vc, value_max)
            return out

    def query_inputs(self, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the query passes read besides the state: `(q, x, kl, vl)` — q contiguous in its last dim, φ(q)'s
        cuBLAS prefix `x`, and k, v as the landmark softmax reads them (contiguous in their last dim)."""
        if q.stride(-1) != 1:
            q = q.contiguous()
        x = self.phi_q.pre(q)
        kl, vl = k, v  # the in-kernel softmax gathers landmark rows itself: no copy (cuDNN: `sdpa_landmarks`)
        if kl.stride(-1) != 1 or vl.stride(-1) != 1:
            kl, vl = kl.contiguous(), vl.contiguous()
        return q, x, kl, vl

    def landmark_output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        landmark_rows: launchers.LandmarkRows | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`(out, lse, lm_src)`: cuDNN's or the TMA-fed kernel's landmark softmax (with `landmark_lse` also its
        log-sum-exp, from which the landmark pass goes on) in the buffer that becomes the output, `lm_src` 1; else a
        fresh output, `lm_src` 0. `landmark_rows`: every landmark's rows as this call's key pass wrote them (the
        TMA-fed kernel reads them; without them they are copied)."""
        res = None
        if self.use_branch and self.landmark_impl == "sdpa":
            res = sdpa_landmarks(q, k, v, self.idx, self.config, self.landmark_lse)
            if res is None:  # no log-sum-exp on this torch: the in-kernel softmax from now on
                self.landmark_impl = "fused"
        elif self.use_branch and self.landmark_impl == "tma" and tma_rows_ok(q):
            res = self._tma_output(q, k, v, landmark_rows)
        if res is None:
            return output_like(q, self.shape[4]), self.dummy, 0
        return res[0], self.dummy if res[1] is None else res[1], 1

    def _tma_output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    landmark_rows: launchers.LandmarkRows | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The TMA-fed landmark softmax's `(out, lse)`, or None where its kernel failed (compiler or launch: warned
        once, the in-kernel softmax from now on)."""
        if landmark_rows is not None:
            kc, vc = landmark_rows.kc, landmark_rows.vc
        else:  # keys the key pass cannot write rows from (not contiguous in D): one copy
            bsz, heads, _, _, d = self.shape
            kc, vc = (t.index_select(2, self.idx).reshape(bsz * heads, self.n_lm, d) for t in (k, v))
        try:
            return tma_landmarks(q, kc, vc, self.landmark_lse, self.config)
        except Exception as exc:  # noqa: BLE001 - e.g. a Triton that cannot compile it: the in-kernel softmax serves
            self.landmark_impl = "fused"
            log.warning("attnplug: ttr kernels: the TMA-fed landmark softmax failed (%s: %s); this layer's landmark "
                        "pass computes it from now on", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
