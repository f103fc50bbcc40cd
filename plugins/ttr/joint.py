"""The joint ttr layer: every interaction with conditioning tokens exact, only image↔image learned.

Joint (double-stream) blocks carry the text-to-image routing, which the hybrid layer of single blocks
cannot keep (its kernel branch sums over the text keys too, and its exact branch gets at most α_max of
the blend). This layer splits each call by who takes part:

- text queries (the first `n_cond` rows) attend every key exactly: torch SDPA on those rows;
- image queries attend an exact set E(q) — every text key, the image landmarks and the query's own
  local window (the landmark backend's `exact_attention`, `core.residual`) — exactly, and the rest of
  the image keys, the far set, through the learned kernel:
  `S_far = Σ_far φ(k) vᵀ`, `z_far = Σ_far φ(k)`, accumulated over the image keys that are neither
  landmarks nor padded, minus each query's own window keys
  (`Σ_{k∈W(q)} (φ(q)·φ(k))·[v, 1]`, over the (2r+1)² window entries: no per-query state);
- the two are combined either under one normaliser (`combine = "shared"`)

      y = (Σ_E e^s v + φ(q)ᵀS_far) / (Σ_E e^s + φ(q)ᵀz_far)
        = O_E + w·(O_far − O_E),   w = σ(log(φ(q)ᵀz_far) + g(q) − LSE_E(q)),

  O_E the exact softmax over E, LSE_E its log-sum-exp, O_far = φ(q)ᵀS_far / φ(q)ᵀz_far, and g(q) a learned
  per-head log-scale (`a_h + b_hᵀq`, optionally plus a small MLP) because φ does not approximate e^s in
  scale — numerically stable (no exponent is ever taken), and the form a fused landmark pass can apply
  in its epilogue from its online-softmax max and sum; or by the hybrid layer's α blend
  (`combine = "blend"`): `O_far + α·(O_E − O_far)`.

a_h is the per-head mixing logit (`alpha_logit`, the parameter of the hybrid layer's α: same optimizer
group). Its start is measured, not guessed: at the first training forward it is set so that the mean
mixing logit equals the true one, `log Σ_far e^s − log φ(q)ᵀz_far` averaged over that call's image
queries (the exact far mass is cheap to compute on a training call's query subsample); a loaded layer
keeps its value. The conditioner scales and shifts O_far (outputs 0, 1) and shifts the mixing logit
(output 2; `blend`: scales and shifts O_E, as the hybrid layer does).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.call import AttentionCall, LayerSpec
from ...core.residual import ExactAttention, ExactKeys
from .kernel_regression import kv_state
from .layer import TtrLayer
from .settings import TtrSettings

#: `exact_attention` of the landmark backend, bound: `(q, k, v, call, mask, query_index=) -> ExactAttention`.
ExactFn = Callable[..., ExactAttention]

#: Floor of the far denominator inside the log (a far set that is empty, or that rounding took below 0).
_DEN_FLOOR = 1e-30
#: Stand-in for the log-sum-exp of a row whose exact set is empty (−inf: the far field is the whole row).
_EMPTY_LSE = -1e4
_LOG_SCALE_HIDDEN = 32
#: Most bytes of gathered window φ(k) and v per query chunk of the far field (fewer queries per chunk than
#: `query_chunk` where a large batch would exceed it).
_WINDOW_CHUNK_BYTES = 512 * 2**20


class JointLayer(TtrLayer):
    """The learned module of a joint layer (see the module docstring). Same φ maps, α logit, conditioner and
    running reference as the hybrid `TtrLayer` (so the same training contract and checkpoint layout), plus the
    log-scale g(q) of the shared normaliser."""

    variant = "joint"

    def __init__(self, spec: LayerSpec, settings: TtrSettings) -> None:
        super().__init__(spec, settings)
        self.combine = settings.joint.combine
        self.head_dim = spec.head_dim
        self.log_scale_kind = settings.joint.log_scale
        if self.combine == "shared":
            self.adaptive = False  # no α here: the mix comes from the two masses
            # b_h of g(q) = a_h + b_hᵀq (+ MLP): zero at start, so g starts as the measured a_h
            self.log_scale_q = nn.Parameter(torch.zeros(spec.heads, spec.head_dim))
            if self.log_scale_kind == "mlp":
                self.log_scale_net = nn.Sequential(nn.Linear(spec.head_dim, _LOG_SCALE_HIDDEN), nn.SiLU(),
                                                   nn.Linear(_LOG_SCALE_HIDDEN, 1))
                nn.init.zeros_(self.log_scale_net[2].weight)
                nn.init.zeros_(self.log_scale_net[2].bias)
            # 1 once a_h was measured on a training call (saved: a loaded layer keeps its a_h)
            self.register_buffer("log_scale_calibrated", torch.zeros((), dtype=torch.float32))
        self.calibrated = False
        self.register_load_state_dict_post_hook(JointLayer._after_joint_load)

    @staticmethod
    def _after_joint_load(module: "JointLayer", incompatible: object) -> None:
        buf = getattr(module, "log_scale_calibrated", None)
        module.calibrated = buf is not None and bool(buf > 0)

    # ---- pieces -----------------------------------------------------------------------------------
    def log_scale(self, q: torch.Tensor) -> torch.Tensor:
        """g(q) − a_h: the query-dependent part of the log-scale, `[B, H, n]` fp32 (q `[B, H, n, D]`)."""
        qf = q.float()
        g = torch.einsum("bhnd,hd->bhn", qf, self.log_scale_q.float())
        if self.log_scale_kind == "mlp":
            g = g + self.log_scale_net(qf).squeeze(-1)
        return g

    def far_keys(self, keys: ExactKeys, n_keys: int, n_cond: int, keep: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
        """`[Bm, Nk]` bool: the image keys that are not landmarks and not padded (the far field before each
        query's window is taken out)."""
        idx, valid = keys.idx, keys.valid
        if idx.dim() == 1:
            is_lm = torch.zeros(1, n_keys, dtype=torch.bool, device=device)
            is_lm[0, idx] = True
        else:  # per-batch sets, padded with index 0 / valid False: count, never overwrite
            assert valid is not None
            counts = torch.zeros(idx.shape[0], n_keys, dtype=torch.int32, device=device)
            is_lm = counts.scatter_add_(1, idx, valid.to(torch.int32)) > 0
        far = ~is_lm
        far[:, :n_cond] = False
        if keep is not None:
            far = far & keep.to(device)
        return far

    def far_field(self, pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                  win_idx: torch.Tensor | None, win_ok: torch.Tensor | None,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Numerator `[B, H, n, Dv]` and denominator `[B, H, n]` (fp32, ≥ 0) of the far field of n queries:
        `φ(q)ᵀS`, `φ(q)ᵀz` minus each query's own window keys (`win_idx [n, W]`, `win_ok [Bm, n, W]`)."""
        b, h, n, f = pq.shape
        if win_idx is not None:
            per_row = b * h * win_idx.shape[-1] * (f + v.shape[-1]) * 4
            chunk = max(1, min(chunk, _WINDOW_CHUNK_BYTES // max(per_row, 1)))
        nums, dens = [], []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            p = pq[:, :, start:stop].float()
            num = torch.matmul(p, s)
            den = torch.matmul(p, z.unsqueeze(-1)).squeeze(-1)
            if win_idx is not None and win_ok is not None:
                rows, w = stop - start, win_idx.shape[-1]
                flat = win_idx[start:stop].reshape(-1)
                pk_w = pk.index_select(2, flat).view(b, h, rows, w, f).float()
                v_w = v.index_select(2, flat).view(b, h, rows, w, v.shape[-1]).float()
                kern = torch.einsum("bhcf,bhcwf->bhcw", p, pk_w) * win_ok[:, None, start:stop].to(p.dtype)
                num = num - torch.einsum("bhcw,bhcwd->bhcd", kern, v_w)
                den = den - kern.sum(dim=-1)
            nums.append(num)
            dens.append(den.clamp_min(0.0))
        if not nums:
            return pq.new_zeros(b, h, 0, v.shape[-1], dtype=torch.float32), pq.new_zeros(b, h, 0, dtype=torch.float32)
        return torch.cat(nums, dim=2), torch.cat(dens, dim=2)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,  # type: ignore[override]
                keep: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                exact: ExactFn | None = None, key_chunk: int = 1024, query_chunk: int = 1024,
                eps: float = 1e-6, feature_dtype: torch.dtype = torch.float32,
                query_index: torch.Tensor | None = None, track_reference: bool = False) -> torch.Tensor:
        """`[B, H, Nq, Dv]` fp32.

        :param keep: `[B, Nk]` bool key padding (True = valid), or None.
        :param mask: the host's mask, handed to SDPA (as `keep`) and to the exact set unchanged.
        :param exact: the landmark backend's `exact_attention` (required: it holds every conditioning token).
        :param query_index: positions of q's rows in the sequence when q is a subset (the distiller's query
            subsample); None when q is every query.
        :param track_reference: a training forward (measures a_h once; `blend`: keeps the running reference of d).
        """
        if exact is None:
            raise ValueError(f"ttr {call.layer_key}: the joint layer needs a landmark backend with exact_attention() "
                             "(every conditioning token is in its exact set); the landmark plugin is blocked, absent "
                             "or [plugins.ttr] landmark = false")
        n_keys, nq = k.shape[2], q.shape[2]
        if query_index is None and nq != n_keys:
            raise ValueError(f"ttr {call.layer_key}: the joint layer got {nq} queries for {n_keys} keys and no "
                             "query_index: which rows are text queries is unknown (pass their positions)")
        n_cond = call.cond_in(n_keys)
        if query_index is None:  # the whole sequence: text rows first, image rows after them (no index work)
            ex = exact(q, k, v, call, mask)
            rows = slice(n_cond, n_keys)
            q_img, o_e, lse = q[:, :, rows], ex.out[:, :, rows], ex.lse[:, :, rows]
            win_idx = None if ex.keys.win_idx is None else ex.keys.win_idx[rows]
            win_ok = None if ex.keys.win_ok is None else ex.keys.win_ok[:, rows]
        else:  # a query subset (training): split its rows by position
            positions = query_index.to(device=q.device, dtype=torch.long)
            img_rows = torch.nonzero(positions >= n_cond).flatten()
            img_pos = positions.index_select(0, img_rows)
            q_img = q.index_select(2, img_rows)
            ex = exact(q_img, k, v, call, mask, query_index=img_pos)
            o_e, lse, win_idx, win_ok = ex.out, ex.lse, ex.keys.win_idx, ex.keys.win_ok
        y = self._image_rows(q_img, k, v, o_e, lse, ex.keys, win_idx, win_ok, call, keep, n_cond, key_chunk,
                             query_chunk, eps, feature_dtype, track_reference)
        attn_mask = None if keep is None else keep[:, None, None, :].to(q.device)
        if query_index is None:
            if n_cond == 0:
                return y
            text = F.scaled_dot_product_attention(q[:, :, :n_cond], k, v, attn_mask=attn_mask)
            return torch.cat([text.float(), y], dim=2)
        text_rows = torch.nonzero(positions < n_cond).flatten()
        text = F.scaled_dot_product_attention(q.index_select(2, text_rows), k, v, attn_mask=attn_mask)
        out = y.new_zeros(*q.shape[:3], v.shape[-1])
        return out.index_copy(2, img_rows, y).index_copy(2, text_rows, text.float())

    def _image_rows(self, q_img: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_e: torch.Tensor,
                    lse: torch.Tensor, keys: ExactKeys, win_idx: torch.Tensor | None, win_ok: torch.Tensor | None,
                    call: AttentionCall, keep: torch.Tensor | None, n_cond: int, key_chunk: int, query_chunk: int,
                    eps: float, feature_dtype: torch.dtype, training: bool) -> torch.Tensor:
        """The image queries' rows `[B, H, n, Dv]` fp32: the exact set (`o_e`, `lse`) combined with the far field."""
        n_keys = k.shape[2]
        pk = self.phi(k, "k", feature_dtype, eps)
        far = self.far_keys(keys, n_keys, n_cond, keep, k.device)
        s, z = kv_state(pk, v, far, key_chunk)
        pq = self.phi(q_img, "q", feature_dtype, eps)
        num, den = self.far_field(pq, pk, v, s, z, win_idx, win_ok, query_chunk)
        o_far = num / (den + eps).unsqueeze(-1)
        cond = self.condition(call, q_img.device)
        if cond is not None:
            o_far = o_far * (1.0 + cond[0]) + cond[1]
        if self.combine == "shared":
            lse = lse.masked_fill(torch.isneginf(lse), _EMPTY_LSE)
            log_den = torch.log(den.clamp_min(_DEN_FLOOR))
            if training and not self.calibrated:
                self._calibrate(q_img, k, far, win_idx, win_ok, log_den, call)
            arg = log_den + self.alpha_logit.float().view(1, -1, 1) + self.log_scale(q_img) - lse
            if cond is not None:
                arg = arg + cond[2]
            w = torch.sigmoid(arg).unsqueeze(-1)  # the far field's share of the row's mass
            y = o_e + w * (o_far - o_e)
            exact_share = 1.0 - w
        else:
            if cond is not None:
                o_e = o_e * (1.0 + cond[2]) + cond[3]
            exact_share = self.alpha(o_far, o_e, training)
            y = o_far + exact_share * (o_e - o_far)
        zero = den.new_zeros(())
        self.last_metrics = {"den_min": den.detach().min() if den.numel() else zero,
                             "alpha_mean": exact_share.detach().mean() if exact_share.numel() else zero}
        return y

    @torch.no_grad()
    def _calibrate(self, q_img: torch.Tensor, k: torch.Tensor, far: torch.Tensor, win_idx: torch.Tensor | None,
                   win_ok: torch.Tensor | None, log_den: torch.Tensor, call: AttentionCall, chunk: int = 64) -> None:
        """Set a_h so that this call's mean mixing logit is the true one: the mean over image queries of
        `log Σ_far e^s − log φ(q)ᵀz_far − (g(q) − a_h) − conditioner shift` (the far set of each query taken
        exactly as the far field counts it)."""
        b, h, n, d = q_img.shape
        n_keys = k.shape[2]
        scale = d ** -0.5
        true = []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            rows = stop - start
            member = far[:, None, :].expand(far.shape[0], rows, n_keys).clone()  # [Bm, c, Nk]
            if win_idx is not None and win_ok is not None:
                ok = win_ok[:, start:stop]
                bm = max(member.shape[0], ok.shape[0])
                idx = win_idx[start:stop][None].expand(bm, rows, -1)
                # count, never overwrite: entries outside the grid hold a clamped (in-grid) index with ok False
                taken = torch.zeros(bm, rows, n_keys, dtype=torch.int32, device=k.device)
                taken = taken.scatter_add_(2, idx, ok.expand(bm, -1, -1).to(torch.int32)) > 0
                member = member.expand(bm, rows, n_keys) & ~taken
            logits = torch.matmul(q_img[:, :, start:stop].float(), k.float().transpose(-1, -2)) * scale
            logits = logits.masked_fill(~member[:, None], float("-inf"))
            true.append(torch.logsumexp(logits, dim=-1))
        true_far = torch.cat(true, dim=2) if true else log_den
        offset = true_far - log_den - self.log_scale(q_img)
        cond = self.condition(call, q_img.device)
        if cond is not None:
            offset = offset - cond[2]
        usable = torch.isfinite(offset)
        count = usable.float().sum(dim=(0, 2))
        mean = torch.where(usable, offset, torch.zeros_like(offset)).sum(dim=(0, 2)) / count.clamp_min(1.0)
        if not bool((count > 0).all()):
            return  # no image query with a far set in this call: measure on a later one
        self.alpha_logit.data.copy_(mean.to(self.alpha_logit.dtype))
        self.log_scale_calibrated.fill_(1.0)
        self.calibrated = True


def joint_extra_bytes(b: int, h: int, nq: int, nk: int, dv: int, feature_dim: int, n_win: int,
                      query_chunk: int, training: bool) -> int:
    """Working bytes a joint layer holds beyond what the hybrid layer's estimate counts: φ of every key (kept
    for the window terms), the gathered window φ(k) and v of one query chunk (of every query when training),
    and the text rows' SDPA output."""
    rows = nq if training else min(nq, query_chunk)
    phi_k = b * h * nk * feature_dim * 4
    window = b * h * rows * n_win * (feature_dim + dv + 1) * 4 * (2 if training else 1)
    return int(phi_k + window + b * h * nq * dv * 4)

