"""`JointServePlan`: the joint ttr layer's served call (plugins/ttr/joint.py, `combine = "shared"`) on the kernels.

Everything that depends only on the weights, dtype, device and shape is built once, as for the hybrid layer's
`ServePlan` (which this extends): the cast feature maps, a_h and b_h of the log-scale, the landmark set (every text
key and the image landmarks: the landmark backend's exact set) and its per-key flags, the far-key mask of the key
pass (image keys that are not landmarks), the grids. A call then runs, with no host↔device copy and no sync:

1. the key pass over the far keys only (S_far, z_far), writing φ of every key into a buffer in the input dtype
   (the query pass's dots read their operands in that dtype anyway; fp32 would double the buffer's bytes);
2. cuDNN's softmax over the landmark set with its log-sum-exp where `choose_landmark_impl` takes it (every row:
   its result is the output buffer, no copy; the text rows' share of that work is n_cond / N);
3. the joint query pass (mode 5) over the image rows only: the landmark softmax (or cuDNN's state) continued over
   each query's window, the window keys' kernel terms taken out of the far field in the same loop, and the shared
   normaliser in the epilogue (with the conditioner and the non-finite guard);
4. the text rows: one SDPA over every key, written into the output's first n_cond rows. The query pass skips the
   text tiles rather than computing rows that SDPA overwrites: it saves their φ(q) and softmax for the price of one
   small copy of n_cond rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cudnn_landmarks import lse_ok
from .reference import PhiWeights
from .serve_plan import ServePlan
from .tiles import KernelConfig, direct_rows


class JointServePlan(ServePlan):
    """The fused call of one joint layer at one shape; `plan(q, k, v, ...)` runs it (see the module docstring).

    :param landmark_idx: `[L]` key indices of the exact set's landmarks (every text position among them).
    :param alpha_logit: a_h `[H]`; :param log_scale_q: b_h `[H, D]` (read at every call: fp32 tensors on the
        device are used as they are).
    :param window, grid: the landmark window (0, None: landmarks only); :param n_cond: the text tokens first.
    :param landmark_prefix, exact_fp8: as `ServePlan`'s.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: PhiWeights, phi_k: PhiWeights, *,
                 landmark_idx: torch.Tensor, alpha_logit: torch.Tensor, log_scale_q: torch.Tensor, eps: float = 1e-6,
                 landmark_impl: str = "auto", config: KernelConfig | None = None, window: int = 0,
                 grid: tuple[int, int] | None = None, n_cond: int = 0, landmark_prefix: int | None = None,
                 exact_fp8: bool = False) -> None:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"JointServePlan: queries must be the whole sequence, got {q.shape[2]} for "
                             f"{k.shape[2]} keys")
        nk = k.shape[2]
        prefix = direct_rows(landmark_idx, landmark_prefix)  # counted before the indices move to the device
        idx = landmark_idx.to(device=q.device, dtype=torch.long)
        flags = torch.zeros(nk, dtype=torch.int8, device=q.device)
        if idx.numel():
            flags.index_fill_(0, idx, 1)
        super().__init__(q, k, v, phi_q, phi_k, landmark_idx=idx, alpha_logit=alpha_logit, adaptive=False, eps=eps,
                         key_mask=True, landmark_impl=landmark_impl, config=config, window=window, grid=grid,
                         n_cond=n_cond, landmark_flags=flags if window else None, landmark_prefix=prefix,
                         exact_fp8=exact_fp8)
        self.n_cond = int(n_cond)  # the text rows are set apart with or without a window
        if self.landmark_impl == "sdpa" and not lse_ok(q):
            self.landmark_impl = "fused"  # the shared normaliser needs the exact set's log-sum-exp
        far = flags == 0
        far[:self.n_cond] = False
        self.far_mask = far.to(torch.int8)[None]  # [1, Nk]: the key pass's mask, shared by the batch
        self.use_branch = True  # the text keys are always in the exact set
        self.landmark_lse = True  # the shared normaliser continues from the exact set's log-sum-exp
        self.modes = (5,)
        self.store_phi_k = True
        bsz, heads, _, _, d = self.shape
        self.key = self._key_launch(self.config, bsz, heads, nk, d)
        self.bq = log_scale_q.detach().to(device=q.device, dtype=torch.float32).reshape(heads, d).contiguous()
        self.n_pk = bsz * heads * nk * self.ft

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                 branch_affine: torch.Tensor | None = None, finite_flag: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, H, N, D]` in q's dtype. `branch_affine`: `[B, 4]` fp32 (the conditioner: O_far's scale and shift,
        the mixing logit's shift), or None; `finite_flag`: as `ServePlan` (image rows not finite are replaced by the
        exact set's row). Key padding is not served here (`joint_unsupported_reasons`)."""
        if key_mask is not None:
            raise ValueError("JointServePlan: key padding is served by the PyTorch path")
        with torch.no_grad():
            bsz, heads, n = self.shape[:3]
            pk = torch.empty(bsz * heads, n, self.ft, device=q.device, dtype=q.dtype)
            rows = self.landmark_rows(k)
            sz, z = self.key_state(k, v, self.far_mask, pk, landmark_rows=rows)
            s_q = self.scaled_state(sz, q.dtype)
            vmax = self.value_max(sz)
            del sz  # as `ServePlan.__call__`: z and vmax, its tail, stay
            out = self.query(q, k, v, s_q, z, branch_affine, finite_flag, phi_k_all=pk, landmark_rows=rows,
                             value_max=vmax)
            if self.n_cond:
                out[:, :, :self.n_cond] = F.scaled_dot_product_attention(q[:, :, :self.n_cond], k, v)
            return out
