"""Plain-PyTorch reference of the ttr layer's inference math — the ground truth the Triton kernels
are tested against (and the fallback where Triton or CUDA is missing).

Shapes: q, k, v `[B, H, N, D]`. A feature map φ is a small MLP applied per token and head:
`φ(x) = act(W_L(… SiLU(W_1 x + b_1) …) + b_L)`, optionally L2-normalised over its features.
Weights are `[D_in, D_out]` (shared by all heads) or `[H, D_in, D_out]` (one per head); biases
`[D_out]` or `[H, D_out]` (`[1, …]` = shared, as plugins/ttr/layer.py stores them). Activations: `"elu+1"` (ELU + 1), `"relu"`, `"hedgehog"`
(`[softmax(a), softmax(−a)]`, so F = 2·D_out of the last layer).

Kernel branch: `S = Σ_k φ(k) vᵀ`, `z = Σ_k φ(k)` in fp32 (masked keys excluded),
`out_k = φ(q)·S / (φ(q)·z + eps)`. Landmark branch: exact softmax of q against the keys at
`landmark_idx`, scale `D^-0.5`. Which keys are landmarks is the landmark plugin's decision
(`LandmarkBackend.indices`, `plugins/landmark/selection.py`); callers pass the indices in, and
this module has no selection of its own (a twin could pick other positions than the served layer).
Optional local window (`window = r > 0`, the landmark plugin's `[plugins.landmark] window`): with the
latent grid `(h, w)` (image tokens row-major after `n_cond` conditioning tokens; queries are the whole
sequence), each image query's softmax runs jointly over the landmark keys and the image keys within
Chebyshev radius r of its own grid position that are not landmarks (each key once; padded window keys
never count); conditioning queries see the landmarks only, and a query with no key at all gets out_l = 0.
Hybrid: `out = out_k + α(out_l − out_k)` with `α = α_max·σ(logit + γ(d_norm − 0.5))`,
`d = 1 − cos(out_k, out_l)`,
`d_norm = min(d / mean_tokens(d), 3) / 3` (adaptive) or `α = α_max·σ(logit)`.
Everything here computes in fp32 and returns the input dtype.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from ....core.exact_fp8 import round_inputs, rounded_softmax
from ..kernel_regression import ACTIVATIONS, feature_map

_ALIASES = {"elu1": "elu+1"}
_LOGIT_CLAMP = 15.0  # as plugins/ttr/layer.py: the σ argument is clamped to ±15


@dataclass(frozen=True)
class PhiWeights:
    """One feature map: layer weights/biases (first to last), activation, L2 normalisation.

    `weights[i]` is `[D_in, D_out]` or `[H, D_in, D_out]`; `biases[i]` is `None`, `[D_out]` or
    `[H, D_out]`. SiLU sits between layers; `activation` follows the last one.
    """

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor | None, ...]
    activation: str = "elu+1"
    l2_norm: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", _ALIASES.get(self.activation, self.activation))
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "biases", tuple(self.biases))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"PhiWeights.activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.weights:
            raise ValueError("PhiWeights.weights: expected at least one layer")
        if len(self.biases) != len(self.weights):
            raise ValueError(f"PhiWeights: {len(self.weights)} weights but {len(self.biases)} biases "
                             "(use None for a layer without bias)")
        for i in range(1, len(self.weights)):
            if self.weights[i].shape[-2] != self.weights[i - 1].shape[-1]:
                raise ValueError(f"PhiWeights.weights[{i}]: input dim {self.weights[i].shape[-2]} does not "
                                 f"match the previous layer's output {self.weights[i - 1].shape[-1]}")

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def in_dim(self) -> int:
        return int(self.weights[0].shape[-2])

    @property
    def feature_dim(self) -> int:
        """F, the number of features φ produces (hedgehog doubles the last layer's width)."""
        out = int(self.weights[-1].shape[-1])
        return 2 * out if self.activation == "hedgehog" else out

    @property
    def per_head(self) -> bool:
        """One map per head (`[H, Din, Dout]` with H > 1); `[1, Din, Dout]` counts as shared."""
        return self.weights[0].dim() == 3 and self.weights[0].shape[0] > 1

    @classmethod
    def from_module(cls, net: object, activation: str, l2_norm: bool, eps: float = 1e-6) -> "PhiWeights":
        """From a module with `weights`/`biases` parameter lists `[G, in, out]`/`[G, out]`
        (plugins/ttr/layer.py's `FeatureMapNet`); tensors are detached, not copied."""
        ws = tuple(w.detach() for w in net.weights)  # type: ignore[attr-defined]
        bs = tuple(None if b is None else b.detach() for b in net.biases)  # type: ignore[attr-defined]
        return cls(ws, bs, activation=activation, l2_norm=l2_norm, norm_eps=eps)


def phi_reference(x: torch.Tensor, phi: PhiWeights) -> torch.Tensor:
    """φ(x) in fp32, `[B, H, N, F]` (`kernel_regression.feature_map`, the one PyTorch φ)."""
    return feature_map(x.float(), [w.float() for w in phi.weights],
                       [None if b is None else b.float() for b in phi.biases], phi.activation, phi.l2_norm,
                       phi.norm_eps)


def kv_state_reference(k: torch.Tensor, v: torch.Tensor, phi_k: PhiWeights,
                       key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`S = Σ φ(k) vᵀ` `[B, H, F, D]` and `z = Σ φ(k)` `[B, H, F]`, fp32; `key_mask` `[B, Nk]` True = keep."""
    fk = phi_reference(k, phi_k)
    if key_mask is not None:
        fk = fk * key_mask[:, None, :, None].to(fk.dtype)
    s = torch.einsum("bhnf,bhnd->bhfd", fk, v.float())
    z = fk.sum(dim=2)
    return s, z


def kernel_branch_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: PhiWeights,
                            phi_k: PhiWeights, eps: float = 1e-6,
                            key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`out_k = φ(q)·S / (φ(q)·z + eps)` in fp32, `[B, H, Nq, D]`."""
    s, z = kv_state_reference(k, v, phi_k, key_mask)
    fq = phi_reference(q, phi_q)
    num = torch.einsum("bhnf,bhfd->bhnd", fq, s)
    den = torch.einsum("bhnf,bhf->bhn", fq, z)
    return num / (den + eps)[..., None]


def exact_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 exact_fp8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in fp32 as the exact softmax's products read them: rounded to e4m3 with `exact_fp8` (per-token q and
    k scales, per-channel v scales over every key; core/exact_fp8.py), else as given."""
    return round_inputs(q, k, v) if exact_fp8 else (q.float(), k.float(), v.float())


def landmark_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmark_idx: torch.Tensor,
                       exact_fp8: bool = False) -> torch.Tensor:
    """Exact fp32 softmax attention of q against the landmark keys, scale `D^-0.5` (`exact_fp8`: in e4m3)."""
    q, k, v = exact_inputs(q, k, v, exact_fp8)
    kl = k.index_select(2, landmark_idx)
    vl = v.index_select(2, landmark_idx)
    scores = torch.einsum("bhnd,bhld->bhnl", q, kl) * q.shape[-1] ** -0.5
    weights = rounded_softmax(scores) if exact_fp8 else torch.softmax(scores, dim=-1)
    return torch.einsum("bhnl,bhld->bhnd", weights, vl)


def check_window(window: int, grid: tuple[int, int] | None, n_cond: int, n_queries: int, n_keys: int) -> None:
    """Raise ValueError unless `(window, grid, n_cond)` describe a usable local window (window 0: anything)."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"window: expected an int >= 0 (Chebyshev radius; 0 = off), got {window!r}")
    if window == 0:
        return
    if grid is None or len(grid) != 2 or any(int(g) != g or g <= 0 for g in grid):
        raise ValueError(f"grid: window = {window} needs the latent grid (h, w) of positive ints, got {grid!r}")
    if not 0 <= n_cond <= n_keys:
        raise ValueError(f"n_cond: expected the conditioning-token count in [0, {n_keys}], got {n_cond}")
    h, w = grid
    if h * w + n_cond != n_keys:
        raise ValueError(f"grid: window = {window} needs h*w + n_cond == Nk, got {h}*{w} + {n_cond} = "
                         f"{h * w + n_cond} for {n_keys} keys")
    if n_queries != n_keys:
        raise ValueError(f"window = {window} needs queries covering the whole sequence (Nq == Nk, their positions "
                         f"are the keys'), got Nq = {n_queries}, Nk = {n_keys}")


def landmark_window_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmark_idx: torch.Tensor | None,
                              window: int, grid: tuple[int, int], n_cond: int,
                              key_mask: torch.Tensor | None = None, chunk: int = 1024,
                              exact_fp8: bool = False) -> torch.Tensor:
    """Landmark branch with the local window, fp32 `[B, H, Nq, D]`: a joint softmax over
    `[q·k_landmarks, q·k_all masked to the query's window]` (a dense allowed-key mask per query chunk).

    Landmark keys are used as given (as `landmark_reference`: duplicates count twice); window keys count
    when they are image keys within Chebyshev radius `window` of an image query, are not landmarks and,
    with `key_mask` `[B, Nk]` (True = keep), are not padded. A row with no key gets zeros. `exact_fp8`: in e4m3
    (`exact_inputs`, `rounded_softmax`).
    """
    check_window(window, grid, n_cond, q.shape[2], k.shape[2])
    b, _, nq, d = q.shape
    nk = k.shape[2]
    dev = q.device
    w_grid = grid[1]
    idx = torch.zeros(0, dtype=torch.long, device=dev) if landmark_idx is None else landmark_idx.to(dev).long()
    q, kf, vf = exact_inputs(q, k, v, exact_fp8)
    kl, vl = kf.index_select(2, idx), vf.index_select(2, idx)
    is_lm = torch.zeros(nk, dtype=torch.bool, device=dev)
    is_lm[idx] = True
    pos = torch.arange(nk, device=dev)
    img = pos >= n_cond
    p = (pos - n_cond).clamp_min(0)
    row, col = p // w_grid, p % w_grid
    keep = None if key_mask is None else key_mask.to(device=dev, dtype=torch.bool)
    scale = d ** -0.5
    outs = []
    for start in range(0, nq, chunk):
        qi = pos[start:start + chunk]
        near = ((row[qi, None] - row[None, :]).abs() <= window) & ((col[qi, None] - col[None, :]).abs() <= window)
        allowed = (near & img[qi, None] & img[None, :] & ~is_lm[None, :])[None]  # [1 or B, c, Nk]
        if keep is not None:
            allowed = allowed & keep[:, None, :]
        qc = q[:, :, start:start + chunk].float()
        logits_w = torch.matmul(qc, kf.transpose(-1, -2)) * scale
        logits_w = logits_w.masked_fill(~allowed[:, None], float("-inf"))
        logits = torch.cat([torch.matmul(qc, kl.transpose(-1, -2)) * scale, logits_w], dim=-1)
        empty = torch.isneginf(logits).all(dim=-1, keepdim=True)  # no key at all: zeros, not NaN
        if exact_fp8:
            weights = rounded_softmax(logits)
        else:
            weights = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
        n_l = idx.numel()
        outs.append(torch.matmul(weights[..., :n_l], vl) + torch.matmul(weights[..., n_l:], vf))
    return torch.cat(outs, dim=2) if outs else q.new_zeros(b, q.shape[1], 0, v.shape[-1], dtype=torch.float32)


def blend_alpha(out_k: torch.Tensor, out_l: torch.Tensor, alpha_logit: torch.Tensor | float, alpha_max: float,
                gamma: float, adaptive: bool, d_reference: torch.Tensor | None = None) -> torch.Tensor:
    """α `[B, H, N, 1]` (fp32). `alpha_logit` is a scalar or per-head `[H]`; d is normalised by its mean per
    (b, h) over tokens, or by `d_reference` (`[H]`, the layer's running mean) when given; the σ argument is
    clamped to ±15 (as plugins/ttr/layer.py)."""
    logit = torch.as_tensor(alpha_logit, dtype=torch.float32, device=out_k.device)
    logit = logit.reshape(1, -1, 1) if logit.dim() == 1 else logit.reshape(1, 1, 1)
    if adaptive:
        dot = (out_k * out_l).sum(-1)
        cos = dot / (out_k.norm(dim=-1) * out_l.norm(dim=-1)).clamp_min(1e-8)
        d = 1.0 - cos
        mean = d.mean(dim=-1, keepdim=True) if d_reference is None else \
            d_reference.to(device=d.device, dtype=torch.float32).reshape(1, -1, 1)
        d_norm = torch.clamp(d / mean.clamp_min(1e-12), max=3.0) / 3.0
        arg = (logit + gamma * (d_norm - 0.5)).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
        a = alpha_max * torch.sigmoid(arg)
    else:
        arg = logit.clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
        a = (alpha_max * torch.sigmoid(arg)).expand(out_k.shape[0], -1, out_k.shape[2])
    return a[..., None]


def ttr_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: PhiWeights, phi_k: PhiWeights,
                          landmark_idx: torch.Tensor | None = None, alpha_logit: torch.Tensor | float = -2.1972,
                          alpha_max: float = 0.2, gamma: float = 2.0, adaptive: bool = True, eps: float = 1e-6,
                          key_mask: torch.Tensor | None = None,
                          branch_affine: Sequence[float] | torch.Tensor | None = None, *, window: int = 0,
                          grid: tuple[int, int] | None = None, n_cond: int = 0,
                          d_reference: torch.Tensor | None = None, exact_fp8: bool = False) -> torch.Tensor:
    """The whole ttr layer (kernel branch, optional landmark branch and blend) in fp32.

    `branch_affine` = (s_k, b_k, s_l, b_l): each branch output becomes `o·(1+s)+b` before the blend
    (the σ/CFG conditioner of the earlier node pack). `window = r > 0` adds the local window to the landmark branch
    (`landmark_window_reference`; needs `grid` (h, w) with h·w + n_cond == Nk and Nq == Nk); the branch
    then runs even without landmarks (conditioning queries get out_l = 0). `d_reference`: see `blend_alpha`.
    `exact_fp8`: the landmark branch's products in e4m3 (core/exact_fp8.py). Returns q's dtype.
    """
    check_window(window, grid, n_cond, q.shape[2], k.shape[2])
    out_k = kernel_branch_reference(q, k, v, phi_q, phi_k, eps, key_mask)
    aff = None if branch_affine is None else torch.as_tensor(branch_affine, dtype=torch.float32).tolist()
    if aff is not None:
        out_k = out_k * (1 + aff[0]) + aff[1]
    if window > 0:
        assert grid is not None
        out_l = landmark_window_reference(q, k, v, landmark_idx, window, grid, n_cond, key_mask,
                                          exact_fp8=exact_fp8)
    elif landmark_idx is None or landmark_idx.numel() == 0:
        return out_k.to(q.dtype)
    else:
        out_l = landmark_reference(q, k, v, landmark_idx, exact_fp8)
    if aff is not None:
        out_l = out_l * (1 + aff[2]) + aff[3]
    a = blend_alpha(out_k, out_l, alpha_logit, alpha_max, gamma, adaptive, d_reference)
    return (out_k + a * (out_l - out_k)).to(q.dtype)


def random_phi(d_in: int, hidden: int, features: int, depth: int, activation: str = "elu+1", heads: int | None = None,
               l2_norm: bool = False, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> PhiWeights:
    """A randomly initialised feature map (tests and benchmarks). `features` is F (hedgehog: last layer F/2)."""
    last = features // 2 if activation == "hedgehog" else features
    dims = [d_in] + [hidden] * (depth - 1) + [last]
    ws, bs = [], []
    for i in range(depth):
        shape = (dims[i], dims[i + 1]) if heads is None else (heads, dims[i], dims[i + 1])
        ws.append((torch.randn(shape, generator=generator) / dims[i] ** 0.5).to(device))
        bshape = (dims[i + 1],) if heads is None else (heads, dims[i + 1])
        bs.append((0.1 * torch.randn(bshape, generator=generator)).to(device))
    return PhiWeights(tuple(ws), tuple(bs), activation=activation, l2_norm=l2_norm)
