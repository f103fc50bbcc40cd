"""The hybrid ttr layer of one attention layer: kernel branch + landmark residual + σ/CFG conditioner.

    out = out_kernel + α · (out_landmark − out_kernel),
    α   = α_max · σ(logit + γ · (d_norm − 0.5))   (adaptive, per token and head)  or  α_max · σ(logit)

with d = 1 − cos(out_kernel, out_landmark) per token and head, d_norm = min(d / d_ref, 3) / 3
(no gradient). The logit is stored per head. α stays in (0, α_max) by construction (the argument
of σ is clamped to ±15, where fp32 σ is still strictly inside (0, 1)).

d_ref is the mean of d over the call's queries while training, and at inference either that too
(`alpha_reference = "call"`) or the per-head running mean of those call means kept while training
(`"running"`, the buffer `d_reference`, saved in checkpoints) — BatchNorm's batch-vs-running statistics.
With a reference known before the call, the fused kernels blend in one pass over the queries instead of two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.call import AttentionCall, LayerSpec
from .kernel_regression import feature_map, kernel_regression
from .settings import TtrSettings

#: The landmark branch as the hybrid layer sees it: `(q, k, v, call, mask) -> [B, H, Nq, Dv]` fp32; when
#: q is a subset of the queries it is also called with `query_index=` (their positions, `[Nq]` long).
LandmarkBranch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionCall, "torch.Tensor | None"],
                          torch.Tensor]

_LOGIT_CLAMP = 15.0


@dataclass
class ServeCache:
    """A layer's fused-path state: one entry per call shape, valid for one weights signature and settings object."""

    signature: tuple[int, ...] | None = None
    settings: object = None
    entries: dict[tuple[object, ...], Any] = field(default_factory=dict)

    def valid_for(self, signature: tuple[int, ...] | None, settings: object) -> bool:
        """Whether the entries were built from these weights and settings; if not, they are dropped and the cache
        starts over for them (a signature of None caches nothing)."""
        if signature is not None and signature == self.signature and settings is self.settings:
            return True
        self.entries.clear()
        self.signature, self.settings = signature, settings
        return False
#: Weight of each training call's mean of d in the running reference: an EMA over ~50 updates, the plain average
#: of the calls seen before that (so a brief distillation already gives the mean of its calls, not its first one).
REFERENCE_MOMENTUM = 0.02


class FeatureMapNet(nn.Module):
    """φ as parameters `[G, in, out]` (G = 1 shared, or one per head) evaluated by `feature_map`."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, depth: int, groups: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, per group
            self.weights.append(nn.Parameter(torch.empty(groups, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(groups, fan_out).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor, activation: str, l2_norm: bool, eps: float) -> torch.Tensor:
        return feature_map(x, list(self.weights), list(self.biases), activation, l2_norm, eps)


def sinusoidal(x: float, dim: int, device: torch.device) -> torch.Tensor:
    """`[sin(x·f_i), cos(x·f_i)]`, f_i = exp(−ln(1e4)·i / (dim/2 − 1)) — the earlier node pack's embedding of σ and CFG."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=device)
    freqs = torch.exp(-math.log(1e4) * i / max(half - 1, 1))
    # x stays a Python scalar: a tensor made from it on the CPU and copied to the GPU would be a blocking
    # copy, i.e. a device sync on every served call (the scalar is cast to fp32 inside the kernel)
    arg = freqs * float(x)
    return torch.cat([torch.sin(arg), torch.cos(arg)])


class Conditioner(nn.Module):
    """σ/CFG → scale and bias of each branch, `o·(1 + s) + b`; the last layer is zero, so it starts as the identity."""

    EMBED = 32

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * self.EMBED, hidden)
        self.fc2 = nn.Linear(hidden, 4)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, sigma: float, cfg: float, device: torch.device) -> torch.Tensor:
        """`[4]` fp32: (s_kernel, b_kernel, s_landmark, b_landmark)."""
        emb = torch.cat([sinusoidal(sigma, self.EMBED, device), sinusoidal(cfg, self.EMBED, device)])
        return self.fc2(F.silu(self.fc1(emb)))


class TtrLayer(nn.Module):
    """The learned module of one attention layer (built from a `LayerSpec` and the ttr settings)."""

    def __init__(self, spec: LayerSpec, settings: TtrSettings) -> None:
        super().__init__()
        s = settings
        heads, head_dim = spec.heads, spec.head_dim
        groups = heads if s.per_head else 1
        out_dim = s.feature_dim // 2 if s.activation == "hedgehog" else s.feature_dim
        hidden = s.hidden_for(head_dim)
        self.activation = s.activation
        self.l2_norm = s.l2_norm
        self.adaptive = s.adaptive_alpha
        self.alpha_max = s.alpha_max
        self.gamma = s.gamma
        self.heads = heads
        self.phi_q = FeatureMapNet(head_dim, hidden, out_dim, s.depth, groups)
        self.phi_k = FeatureMapNet(head_dim, hidden, out_dim, s.depth, groups) if s.split_qk else None
        init = math.log(s.alpha_init / (1.0 - s.alpha_init))
        self.alpha_logit = nn.Parameter(torch.full((heads,), init, dtype=torch.float32))
        self.conditioner = Conditioner() if s.conditioner else None
        self.alpha_reference = s.alpha_reference
        # running mean of d per head (0 = none kept yet); whether it holds one is known without reading it
        # (a device sync): set by training and by loading a state dict
        self.register_buffer("d_reference", torch.zeros(heads, dtype=torch.float32))
        # training calls folded in (a tensor: no Python state for torch.compile to specialise on); not saved — a
        # loaded reference counts as settled
        self.register_buffer("d_reference_calls", torch.zeros((), dtype=torch.float32), persistent=False)
        self.reference_tracked = False
        self.register_load_state_dict_post_hook(TtrLayer._after_load)
        self.last_metrics: dict[str, torch.Tensor] = {}
        #: what the fused path built from these weights (`backend.TtrBackend`: serve plans per call shape), valid
        #: while `weights_signature()` is what it was built with
        self.serve_cache = ServeCache()
        self._signature_slots: list[tuple[dict[str, torch.Tensor], str]] | None = None

    def weights_signature(self) -> tuple[int, ...] | None:
        """Address and version counter of every parameter and buffer: it changes whenever the weights do — an
        optimizer step, a load, a move to another device — so what is built from them (serve plans, the conditioner
        bank) is rebuilt then and never served stale. None when a tensor keeps no version counter (an inference
        tensor): then nothing may be cached. (Writes through `.data` bypass the version counter and are not seen.)"""
        slots = self._signature_slots
        if slots is None:
            slots = self._signature_slots = [(table, name) for m in self.modules()
                                             for table in (m._parameters, m._buffers) for name in table]
        try:
            sig: list[int] = []
            for table, name in slots:
                t = table[name]
                sig += (t.data_ptr(), t._version)
        except (RuntimeError, AttributeError):  # an inference tensor (no version counter), or a slot set to None
            return None
        return tuple(sig)

    @staticmethod
    def _after_load(module: "TtrLayer", incompatible: object) -> None:
        # a file without a running reference (older checkpoints: `state.py` fills the buffer with zeros) keeps none
        module.reference_tracked = bool((module.d_reference > 0).all())
        module.d_reference_calls.fill_(1.0 / REFERENCE_MOMENTUM if module.reference_tracked else 0.0)

    def running_reference(self) -> torch.Tensor | None:
        """The `[H]` reference of d to serve with, or None for the call's own mean (`alpha_reference = "call"`,
        a fixed α, or no running mean kept yet)."""
        if self.adaptive and self.alpha_reference == "running" and self.reference_tracked:
            return self.d_reference
        return None

    def set_d_reference(self, mean: torch.Tensor) -> None:
        """Set the running reference of d (`[H]`, > 0): what training keeps; tools without training use it."""
        mean = mean.detach().to(device=self.d_reference.device, dtype=torch.float32).reshape(-1)
        if mean.numel() != self.heads:
            raise ValueError(f"d_reference: expected {self.heads} values (one per head), got {mean.numel()}")
        self.d_reference.copy_(mean)
        self.d_reference_calls.fill_(1.0 / REFERENCE_MOMENTUM)
        self.reference_tracked = True

    def _track_reference(self, call_mean: torch.Tensor) -> None:
        """Fold one training call's mean of d (`[B, H, 1]`) into the running reference (no sync: a non-finite
        mean leaves it unchanged)."""
        new = call_mean.detach().float().mean(dim=0).reshape(-1).clamp_min(1e-12)
        with torch.no_grad():
            ok = torch.isfinite(new)
            weight = (1.0 / (self.d_reference_calls + 1.0)).clamp_min(REFERENCE_MOMENTUM)  # 1 for the first call
            self.d_reference.copy_(torch.where(ok, torch.lerp(self.d_reference, new, weight), self.d_reference))
            self.d_reference_calls.add_(ok.all().float())
        self.reference_tracked = True

    # ---- pieces -----------------------------------------------------------------------------------
    def phi(self, x: torch.Tensor, which: str, dtype: torch.dtype, eps: float) -> torch.Tensor:
        """Features `[B, H, n, F]` of queries (`which="q"`) or keys (`"k"`), computed in `dtype`."""
        net = self.phi_q if which == "q" or self.phi_k is None else self.phi_k
        return net(x.to(dtype), self.activation, self.l2_norm, eps)

    def alpha(self, out_k: torch.Tensor, out_l: torch.Tensor, track_reference: bool = False,
              call_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Blend weight, broadcastable to `[B, H, Nq, 1]`, strictly inside (0, α_max).

        :param track_reference: training: normalise d by this call's mean and fold it into the running reference.
        :param call_mean: the call's mean of d, `[B, H, Nq] -> [B, H, 1]`, where q holds only part of the call's
            queries (a sequence-parallel shard: `parallel.py`); default the mean over q's rows.
        """
        logit = self.alpha_logit.float().view(1, self.heads, 1)
        if self.adaptive:
            ok, ol = out_k.detach(), out_l.detach()
            d = 1.0 - F.cosine_similarity(ok, ol, dim=-1, eps=1e-8)  # [B, H, Nq]
            running = None if track_reference else self.running_reference()
            if running is not None:
                mean = running.view(1, self.heads, 1)
            else:
                mean = d.mean(dim=-1, keepdim=True) if call_mean is None else call_mean(d)
            if track_reference:
                self._track_reference(mean)
            d_norm = (d / mean.clamp_min(1e-12)).clamp(max=3.0) / 3.0
            arg = logit + self.gamma * (d_norm - 0.5)
        else:
            arg = logit
        return (self.alpha_max * torch.sigmoid(arg.clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP))).unsqueeze(-1)

    def condition_key(self, call: AttentionCall) -> tuple[float, float] | None:
        """`(σ, CFG)` the conditioner sees for this call (CFG 1 when unknown), or None: no conditioner, or σ unknown
        or not finite (the branches are then left as they are)."""
        if self.conditioner is None or call.sigma is None or not math.isfinite(call.sigma):
            return None
        cfg = call.cfg_scale if call.cfg_scale is not None and math.isfinite(call.cfg_scale) else 1.0
        return float(call.sigma), float(cfg)

    def condition(self, call: AttentionCall, device: torch.device) -> torch.Tensor | None:
        """Conditioner output `[4]` for this call (differentiable), or None (see `condition_key`)."""
        key = self.condition_key(call)
        if key is None or self.conditioner is None:
            return None
        return self.conditioner(key[0], key[1], device)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                keep: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                landmark: LandmarkBranch | None = None, key_chunk: int = 1024, query_chunk: int = 1024,
                eps: float = 1e-6, feature_dtype: torch.dtype = torch.float32,
                query_index: torch.Tensor | None = None, track_reference: bool = False) -> torch.Tensor:
        """`[B, H, Nq, Dv]` fp32.

        :param keep: `[B, Nk]` bool key padding (True = valid) for the kernel branch, or None.
        :param mask: the host's mask, handed unchanged to the landmark branch.
        :param landmark: the landmark branch, or None for kernel-only.
        :param query_index: positions of q's rows in the sequence when q is a subset (handed to the
            landmark branch, whose local window depends on them), None when q is every query.
        :param track_reference: a training forward: keep the running reference of d (see `alpha`).
        """
        out_k, den = kernel_regression(q, k, v, lambda x: self.phi(x, "q", feature_dtype, eps),
                                       lambda x: self.phi(x, "k", feature_dtype, eps), keep, eps,
                                       key_chunk, query_chunk)
        branch = None if landmark is None else (
            (lambda: landmark(q, k, v, call, mask)) if query_index is None else
            (lambda: landmark(q, k, v, call, mask, query_index=query_index)))
        return self.combine(out_k, den, call, branch, track_reference)

    def combine(self, out_k: torch.Tensor, den: torch.Tensor, call: AttentionCall,
                landmark: Callable[[], torch.Tensor] | None, track_reference: bool = False,
                call_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The kernel branch's output `out_k` (denominators `den`) with the conditioner applied, blended with the
        landmark branch's output (`landmark()`, None: kernel-only) at α (`alpha`'s arguments)."""
        cond = self.condition(call, out_k.device)
        if cond is not None:
            out_k = out_k * (1.0 + cond[0]) + cond[1]
        metrics = {"den_min": den.detach().min() if den.numel() else den.new_zeros(())}
        if landmark is None:
            self.last_metrics = metrics
            return out_k
        out_l = landmark()
        if cond is not None:
            out_l = out_l * (1.0 + cond[2]) + cond[3]
        a = self.alpha(out_k, out_l, track_reference) if call_mean is None else \
            self.alpha(out_k, out_l, track_reference, call_mean)
        metrics["alpha_mean"] = a.detach().mean()
        self.last_metrics = metrics
        return out_k + a * (out_l - out_k)
