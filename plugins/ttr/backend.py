"""The `ttr` learned backend: one `TtrLayer` per attention layer, built lazily from its `LayerSpec`.

The landmark residual is found through the session's backend registry (`landmark_backend`, default
"landmark") at first use and called through its `branch(q, k, v, call, mask)`; when the landmark
plugin is blocked or absent the layers run kernel-only. Plugins never import each other.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ...core.backend import Capabilities, LearnedBackend, capability_reasons
from ...core.call import AttentionCall, LayerSpec
from ...core.masks import key_padding, served_key_padding
from .layer import LandmarkBranch, TtrLayer
from .settings import TtrSettings
from . import state as _state

if TYPE_CHECKING:
    from ...core.session import Session

log = logging.getLogger("attnplug")


class TtrBackend(LearnedBackend):
    """Learned kernel-regression attention with a landmark residual (see `layer.TtrLayer`)."""

    name = "ttr"
    capabilities = Capabilities(mask_kinds=("none", "key_padding"), learned=True, exact=False)

    def __init__(self, settings: TtrSettings | None = None, session: "Session | None" = None,
                 landmark: LandmarkBranch | None = None) -> None:
        """:param landmark: a landmark branch to use directly (library use, tests); otherwise it is
        looked up by name in `session.backends` at first use."""
        super().__init__()
        self.settings = settings or TtrSettings()
        self.session = session
        self._landmark: LandmarkBranch | None = landmark
        self._landmark_resolved = landmark is not None
        #: sticky per-layer chunk sizes (e.g. shrunk after an out-of-memory), `(key_chunk, query_chunk)`.
        self.chunks: dict[str, tuple[int, int]] = {}
        self._fused_failed: set[str] = set()  # layers whose fused kernels failed once ('auto' stops trying)

    # ---- landmark branch via the registry -------------------------------------------------------
    def landmark_branch(self) -> LandmarkBranch | None:
        """The landmark residual, resolved once: `session.backends[landmark_backend].branch`, or None."""
        if not self.settings.landmark:
            return None
        if not self._landmark_resolved:
            self._landmark_resolved = True
            name = self.settings.landmark_backend
            backend = None
            if self.session is not None and name in self.session.backends:
                backend = self.session.backends.get(name)
            branch = getattr(backend, "branch", None)
            if branch is None:
                log.info("attnplug: ttr: no backend %r with a branch() is registered (plugin blocked or "
                         "absent); ttr layers run kernel-only", name)
            self._landmark = branch
        return self._landmark

    # ---- layers -------------------------------------------------------------------------------------
    def build_layer(self, spec: LayerSpec) -> TtrLayer:
        return TtrLayer(spec, self.settings)

    def layer_chunks(self, layer_key: str) -> tuple[int, int]:
        """`(key_chunk, query_chunk)` for a layer: its sticky override, else the config's."""
        return self.chunks.get(layer_key, (self.settings.key_chunk, self.settings.query_chunk))

    def set_layer_chunks(self, layer_key: str, key_chunk: int, query_chunk: int) -> None:
        """Sticky chunk sizes for one layer (the distiller shrinks them after an OOM); saved in checkpoints."""
        if key_chunk < 1 or query_chunk < 1:
            raise ValueError(f"ttr {layer_key}: chunk sizes must be >= 1, got {key_chunk}, {query_chunk}")
        self.chunks[layer_key] = (int(key_chunk), int(query_chunk))

    def not_supported_reasons(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                              mask: torch.Tensor | None = None) -> list[str]:
        reasons = capability_reasons(self.capabilities, q, k, v, mask)
        if reasons:
            return reasons
        spec = self.specs.get(call.layer_key)
        if spec is not None and (spec.heads, spec.head_dim) != (q.shape[1], q.shape[3]):
            reasons.append(f"layer {call.layer_key} was built for {spec.heads} heads x {spec.head_dim}, "
                           f"got {q.shape[1]} x {q.shape[3]}")
        if k.shape[2] != v.shape[2]:
            reasons.append(f"k has {k.shape[2]} tokens, v has {v.shape[2]}")
        return reasons

    def _run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
             mask: torch.Tensor | None, layer: TtrLayer, feature_dtype: torch.dtype,
             query_index: torch.Tensor | None = None, training: bool = False) -> torch.Tensor:
        keep = None
        if mask is not None:
            keep = key_padding(mask, q.shape[2], k.shape[2])
            if keep is None:
                raise ValueError(f"ttr {call.layer_key}: only key-padding masks are supported")
            if keep.shape[0] == 1 and k.shape[0] > 1:
                keep = keep.expand(k.shape[0], -1)
        kc, qc = self.layer_chunks(call.layer_key)
        return layer(q, k, v, call, keep, mask, self.landmark_branch(), kc, qc, self.settings.eps, feature_dtype,
                     query_index, track_reference=training)

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
               mask: torch.Tensor | None, layer: TtrLayer) -> torch.Tensor | None:
        """The fused Triton path (plugins/ttr/kernels) when the config allows it and it serves the call;
        None means "use the PyTorch path". Same math: the kernels are tested against the reference."""
        mode = self.settings.kernel
        if mode == "torch" or (mode == "auto" and (q.device.type != "cuda" or q.dtype == torch.float32
                                                   or call.layer_key in self._fused_failed
                                                   or torch.compiler.is_compiling())):
            # 'auto' keeps fp32 on the PyTorch path (the kernels are tuned for bf16/fp16), and so is
            # everything under torch.compile (dynamo traces the PyTorch path into one graph)
            return None
        from .kernels import PhiWeights, fused_unsupported_reasons, run_fused_kernels  # no triton import here

        eps = self.settings.eps
        phi_q = PhiWeights.from_module(layer.phi_q, layer.activation, layer.l2_norm, eps)
        phi_k = PhiWeights.from_module(layer.phi_k, layer.activation, layer.l2_norm, eps) \
            if layer.phi_k is not None else phi_q
        keep = key_padding(mask, q.shape[2], k.shape[2]) if mask is not None else None
        if mask is not None and keep is None:
            return None  # a full mask: the PyTorch path reports it
        keep = served_key_padding(keep, k.shape[0])
        branch = self.landmark_branch()
        idx = None
        window, grid, n_cond = 0, None, 0
        reasons: list[str] = []
        if branch is not None:
            owner = getattr(branch, "__self__", None)
            if not hasattr(owner, "indices"):
                reasons.append(f"landmark backend {self.settings.landmark_backend!r} exposes no indices()")
            else:
                if hasattr(owner, "window_plan"):
                    # the landmark backend's own decision (and its warning, once): the fused window serves exactly
                    # where its branch would; where the window cannot apply (no grid, a grid that does not hold
                    # the image tokens) its branch uses the landmarks only, and so do the kernels (window 0)
                    window, grid = owner.window_plan(q, k, call)
                    n_cond = call.cond_in(k.shape[2]) if window else 0
                if not reasons:
                    idx, valid = owner.indices(k, call, mask)
                    if valid is not None:
                        reasons.append("per-batch landmark sets (key padding with landmarks)")
        if not reasons:
            reasons = fused_unsupported_reasons(q, k, v, phi_q, phi_k, keep, idx, window)
        if reasons:
            if mode == "triton":
                raise ValueError(f"ttr {call.layer_key}: kernel = 'triton' but the fused path cannot serve this "
                                 "call: " + "; ".join(reasons))
            return None
        cond = layer.condition(call, q.device)
        try:
            # checked above (reasons empty): the kernels directly, not ttr_forward_fused's second check
            out = run_fused_kernels(q, k, v, phi_q, phi_k, landmark_idx=idx, alpha_logit=layer.alpha_logit.detach(),
                                    alpha_max=layer.alpha_max, gamma=layer.gamma, adaptive=layer.adaptive, eps=eps,
                                    key_mask=keep, branch_affine=None if cond is None else cond.detach(),
                                    window=window, grid=grid, n_cond=n_cond, d_reference=layer.running_reference())
        except Exception as exc:  # noqa: BLE001 - e.g. Triton out of resources: the PyTorch path still serves
            if mode == "triton" or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            self._fused_failed.add(call.layer_key)
            log.warning("attnplug: ttr %s: fused kernels failed (%s: %s); this layer uses the PyTorch path from "
                        "now on", call.layer_key, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        layer.last_metrics = {}  # the fused path computes no per-call statistics
        return out

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Inference: no autograd, fp32 accumulation, output in q's dtype (fused kernels where allowed)."""
        layer = self.layer(LayerSpec.from_tensors(call.layer_key, q), q.device)
        with torch.no_grad():
            fused = self._fused(q, k, v, call, mask, layer)  # type: ignore[arg-type]
        if fused is not None:
            return fused.to(q.dtype)
        fdtype = torch.float32
        if self.settings.feature_precision == "input" and q.device.type != "cpu":
            fdtype = q.dtype
        with torch.no_grad():
            out = self._run(q, k, v, call, mask, layer, fdtype)  # type: ignore[arg-type]
        return out.to(q.dtype)

    # ---- training contract ---------------------------------------------------------------------------
    def _module(self, layer_key: str) -> TtrLayer:
        module = self.layers.get(layer_key)
        if module is None:
            raise KeyError(f"ttr: layer {layer_key!r} has no module yet; build it with layer(spec) first "
                           f"(known layers: {sorted(self.layers)})")
        return module  # type: ignore[return-value]

    def train_forward(self, layer_key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      call: AttentionCall, mask: torch.Tensor | None = None,
                      query_index: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable fp32 forward of one layer (plain PyTorch, autograd on); `query_index`: the
        positions of q's rows when q is a query subset (the landmark window needs them). Also keeps the layer's
        running mean of d (`alpha_reference`)."""
        layer = self._module(layer_key)
        with torch.enable_grad():
            return self._run(q.float(), k.float(), v.float(), call, mask, layer, torch.float32, query_index,
                             training=True)

    def param_groups(self, layer_key: str) -> dict[str, list[torch.nn.Parameter]]:
        """`phi`: both feature maps and the conditioner; `alpha`: the per-head blend logits."""
        layer = self._module(layer_key)
        alpha = [layer.alpha_logit]
        phi = [p for n, p in layer.named_parameters() if n != "alpha_logit"]
        return {"phi": phi, "alpha": alpha}

    def attention_weights(self, layer_key: str, q: torch.Tensor, k: torch.Tensor, call: AttentionCall,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
        """The student's implied attention rows `[B, H, n, Nk]` for queries `q` (for the distiller's
        attention KL and top-k metrics; no autograd).

        Kernel weights `φ(q)·φ(k) / (φ(q)·z + ε)`; with the landmark residual, its softmax weights on
        the landmark keys blended at the base `α = α_max·σ(logit)` — the adaptive shift depends on the
        values, which these metrics do not see. The conditioner's affine is left out. Rows are
        renormalised to sum to 1. Exact (`weights @ v == forward`) for a non-adaptive layer without
        conditioner.
        """
        layer = self._module(layer_key)
        eps = self.settings.eps
        with torch.inference_mode(False), torch.no_grad():
            q32, k32 = q.float(), k.float()
            pq = layer.phi(q32, "q", torch.float32, eps)
            pk = layer.phi(k32, "k", torch.float32, eps)
            keep = key_padding(mask, q.shape[2], k.shape[2]) if mask is not None else None
            if keep is not None:
                pk = pk * keep[:, None, :, None].to(pk.dtype)
            num = pq @ pk.transpose(-1, -2)
            weights = num / (num.sum(-1, keepdim=True) + eps)
            branch = self.landmark_branch()
            owner = getattr(branch, "__self__", None)
            if branch is not None and hasattr(owner, "indices"):
                weights = self._blend_landmark_rows(layer, weights, q32, k32, *owner.indices(k, call, mask))
            return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)

    @staticmethod
    def _blend_landmark_rows(layer: TtrLayer, weights: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             idx: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """`(1 − α)·weights + α·(landmark softmax rows placed on their keys)`, α at its base value."""
        b, h, _, d = k.shape
        idx = idx.expand(b, -1) if idx.dim() == 1 else idx  # [B, L]
        gather = idx[:, None, :, None].expand(b, h, idx.shape[1], d)
        scores = (q @ torch.gather(k, 2, gather).transpose(-1, -2)) * d ** -0.5  # [B, H, n, L]
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        rows = torch.zeros_like(weights).scatter_add_(
            -1, idx[:, None, None, :].expand(*scores.shape), scores.softmax(-1))
        alpha = layer.alpha_max * torch.sigmoid(layer.alpha_logit.float().clamp(-15.0, 15.0))
        alpha = alpha.view(1, h, 1, 1)
        return (1 - alpha) * weights + alpha * rows

    def layer_metrics(self, layer_key: str) -> dict[str, float]:
        """`alpha_mean` (mean α of the last forward, when the landmark branch ran) and `den_min`
        (smallest Nadaraya–Watson denominator). Converted to floats only here (one sync)."""
        layer = self.layers.get(layer_key)
        if layer is None:
            return {}
        return {k: float(v) for k, v in layer.last_metrics.items()}  # type: ignore[union-attr]

    # ---- memory --------------------------------------------------------------------------------------
    def memory_estimate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                        training: bool = False) -> int:
        """Bytes of working memory of one call beyond inputs, output and weights (fp32 everywhere).

        Inference: φ activations of one key chunk and one query chunk, S and z, the fp32 kernel
        output and denominators, the landmark branch's own estimate (its fp32 output included) and
        the blend. Training: autograd keeps φ activations of every token (hence ×2 for gradients).
        """
        s = self.settings
        b, h, nq, d = q.shape
        nk, dv = k.shape[2], v.shape[-1]
        f = s.feature_dim
        hid = s.hidden_for(d) * (s.depth - 1)
        kc, qc = self.layer_chunks(call.layer_key)
        per_token = hid + 2 * f  # hidden activations, pre-activation and features
        if training:
            phi = 2 * b * h * (nq + nk) * (per_token + d) * 4
        else:
            phi = b * h * (min(kc, nk) * (per_token + d + dv) + min(qc, nq) * (per_token + d + dv)) * 4
        state = b * h * f * (dv + 1) * 4
        out_k = b * h * nq * (dv + 1) * 4
        total = phi + state + out_k
        branch = self.landmark_branch()
        owner = getattr(branch, "__self__", None)
        if branch is not None:
            lm = owner.memory_estimate(q, k, v, call, training) if hasattr(owner, "memory_estimate") \
                else b * h * nq * dv * 4
            blend = b * h * nq * (dv * 2 + 3) * 4  # difference, blended result, d / d_norm / α
            total += lm + blend
        if q.dtype != torch.float32:
            total += b * h * (min(qc, nq) + min(kc, nk)) * (d + dv) * 4  # fp32 copies of chunks
        return int(total)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return _state.backend_state(self)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        _state.load_backend_state(self, tensors, meta)

    def landmark_settings(self) -> dict[str, Any] | None:
        """Settings of the landmark backend in use (recorded in checkpoints), or None (kernel-only)."""
        owner = getattr(self.landmark_branch(), "__self__", None)
        settings = getattr(owner, "settings", None)
        return settings.model_dump() if hasattr(settings, "model_dump") else None
