"""The `ttr` learned backend: one `TtrLayer` per attention layer, built lazily from its `LayerSpec`.

The landmark residual is found through the session's backend registry (`landmark_backend`, default
"landmark") at first use: any backend that implements the core's `ResidualBranch` contract; when the landmark
plugin is blocked or absent the layers run kernel-only. Plugins never import each other.

A served call on CUDA in bf16/fp16 (`kernel = "auto"`) runs one `ServePlan` cached on its layer per call shape —
cast weights, landmark indices and flags, window, tiles and launches, the fused-vs-PyTorch verdict with its reasons
— rebuilt when the layer's weights change, and reads the σ/CFG conditioner's output from a bank computed once per
step for every layer. Everything else (CPU, fp32, masks with landmarks, torch.compile, a failed fused launch) takes
the PyTorch path.

A sequence-parallel call (`call.shard`) takes the same verdict: a cached `parallel_fused.ShardedPlan` (the fused
kernels for this rank's work, state all-reduced, landmark and halo rows gathered) where the kernels serve, else
`parallel.sharded_forward`; a fused failure there raises (every rank must take the same path).

Layers that `[plugins.ttr] joint_layers` selects are `joint.JointLayer`s instead (exact wherever
conditioning tokens take part); they use the residual's `exact_attention` on the PyTorch path and, when served
fused (`combine = "shared"`, linear log-scale, no key padding), a `JointServePlan` cached the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...core.backend import Capabilities, LearnedBackend, StagedState, capability_reasons
from ...core.call import AttentionCall, LayerSpec
from ...core.exact_fp8 import fp8_unsupported_reason
from ...core.finite import guard_rows
from ...core.masks import key_padding, served_key_padding
from ...core.residual import ResidualBranch, ShardedResidualBranch, residual_problems
from ...core.shard import shard_reasons
from . import state as _state
from .conditioning import ConditionerBank
from .joint import ExactFn, JointLayer, joint_extra_bytes
from .layer import LandmarkBranch, TtrLayer
from .parallel import sharded_forward
from .parallel_fused import ShardedPlan, shard_layout
from .settings import TtrSettings

if TYPE_CHECKING:
    from ...core.session import Session
    from .kernels.serve_plan import ServePlan

log = logging.getLogger("attnplug")


@dataclass(frozen=True)
class _Served:
    """How one call shape of one layer is served: a fused plan, or the PyTorch path (`reasons`: why, where the
    fused path was asked for and cannot serve; empty where the PyTorch path is simply the configured one)."""

    plan: "ServePlan | ShardedPlan | None"
    reasons: tuple[str, ...] = ()


class TtrBackend(LearnedBackend):
    """Learned kernel-regression attention with a landmark residual (see `layer.TtrLayer`)."""

    name = "ttr"
    capabilities = Capabilities(mask_kinds=("none", "key_padding"), learned=True, exact=False,
                                sequence_parallel=True)

    def __init__(self, settings: TtrSettings | None = None, session: "Session | None" = None,
                 landmark: "ResidualBranch | LandmarkBranch | None" = None) -> None:
        """:param landmark: the residual branch to use directly (library use, tests) — a `ResidualBranch` such as a
        `LandmarkBackend`, or its bound `branch` method; otherwise it is looked up by name in `session.backends`
        at first use."""
        super().__init__()
        self.settings = settings or TtrSettings()
        self.session = session
        self._residual: ResidualBranch | None = _as_residual(landmark)
        self._residual_resolved = landmark is not None
        #: sticky per-layer chunk sizes (e.g. shrunk after an out-of-memory), `(key_chunk, query_chunk)`.
        self.chunks: dict[str, tuple[int, int]] = {}
        self._fused_failed: set[str] = set()  # layers whose fused kernels failed once ('auto' stops trying)
        self._fp8_warned = False  # FP8 asked for on a GPU without it (warned once)
        self.conditioner_bank = ConditionerBank()

    # ---- the residual branch via the registry ------------------------------------------------------
    def residual(self) -> ResidualBranch | None:
        """The residual branch, resolved once: `session.backends[landmark_backend]` when it implements
        `ResidualBranch`, else None (kernel-only, logged)."""
        if not self.settings.landmark:
            return None
        if not self._residual_resolved:
            self._residual_resolved = True
            name = self.settings.landmark_backend
            candidate = None
            if self.session is not None and name in self.session.backends:
                candidate = self.session.backends.get(name)
            if candidate is None and self.session is None:
                pass  # library use without a session and without a branch given: kernel-only
            elif candidate is None:
                log.info("attnplug: ttr: no backend %r is registered (plugin blocked or absent); ttr layers run "
                         "kernel-only", name)
            elif not isinstance(candidate, ResidualBranch):
                log.warning("attnplug: ttr: backend %r is not a residual branch (%s); ttr layers run kernel-only",
                            name, ", ".join(residual_problems(candidate)))
            else:
                self._residual = candidate
        return self._residual

    def landmark_branch(self) -> LandmarkBranch | None:
        """The residual's `branch` (what the hybrid layer calls), or None: kernel-only."""
        residual = self.residual()
        return None if residual is None else residual.branch

    def exact_attention_fn(self) -> ExactFn | None:
        """The landmark backend's `exact_attention` (what joint layers need), or None."""
        return getattr(self.residual(), "exact_attention", None)

    def exact_fp8(self, residual: ResidualBranch, device: torch.device) -> bool:
        """Whether the fused kernels compute the residual's exact softmax in e4m3 on `device`: its `precision` is
        'fp8' and the GPU has FP8 tensor cores (else the call's dtype, warned once)."""
        if residual.precision != "fp8":
            return False
        why = fp8_unsupported_reason(device)
        if why:
            self._warn_fp8_once(f"not on {device} ({why})")
        return not why

    def _warn_fp8_once(self, where: str) -> None:
        if not self._fp8_warned:
            self._fp8_warned = True
            log.warning("attnplug: ttr: the exact branch's precision = 'fp8' is not served %s; the fused kernels "
                        "compute it in the call's dtype", where)

    # ---- layers -------------------------------------------------------------------------------------
    def build_layer(self, spec: LayerSpec) -> TtrLayer:
        """The hybrid layer, or the joint layer where `joint_layers` selects the key."""
        if self.settings.variant_for(spec.layer_key) == "joint":
            return JointLayer(spec, self.settings)
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
        if self.settings.variant_for(call.layer_key) == "joint" and self.exact_attention_fn() is None:
            reasons.append(f"joint layer {call.layer_key} needs backend {self.settings.landmark_backend!r} with "
                           "exact_attention() (the landmark plugin is blocked or absent, or [plugins.ttr] landmark "
                           "= false)")
        if call.shard is not None:
            reasons += self._shard_reasons(q, call, mask)
        return reasons

    def _shard_reasons(self, q: torch.Tensor, call: AttentionCall, mask: torch.Tensor | None) -> list[str]:
        """Why a sequence-parallel call cannot be served (`parallel.py`): joint layers and residuals without
        `sharded_branch` are not sharded yet."""
        reasons = shard_reasons(call, q, mask)
        if self.settings.variant_for(call.layer_key) == "joint":
            reasons.append(f"joint layer {call.layer_key} on a sequence-parallel call (not sharded yet)")
        residual = self.residual()
        if residual is not None and not isinstance(residual, ShardedResidualBranch):
            reasons.append(f"residual backend {self.settings.landmark_backend!r} has no sharded_branch()")
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
        residual = self.exact_attention_fn() if isinstance(layer, JointLayer) else self.landmark_branch()
        return layer(q, k, v, call, keep, mask, residual, kc, qc, self.settings.eps, feature_dtype,  # type: ignore[arg-type]
                     query_index, track_reference=training)

    # ---- serving --------------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Inference: no autograd, fp32 accumulation, output in q's dtype (fused kernels where allowed)."""
        return self._serve(q, k, v, call, mask, None)

    def forward_guarded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                        mask: torch.Tensor | None, finite_flag: torch.Tensor) -> torch.Tensor:
        """`forward` keeping non-finite rows out of the output without a sync: on the fused path the kernels' last
        pass replaces such a row by the exact landmark branch's row (kernel-only: zeros) and raises `finite_flag`;
        on the PyTorch path `core.finite.guard_rows` does it (zeros)."""
        return self._serve(q, k, v, call, mask, finite_flag)

    def _serve(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
               mask: torch.Tensor | None, finite_flag: torch.Tensor | None) -> torch.Tensor:
        if call.shard is not None:  # one rank's slice of the sequence: partial sums all-reduced (parallel.py)
            return self._serve_sharded(q, k, v, call, finite_flag)
        if torch.compiler.is_compiling():  # dynamo traces the PyTorch path into one graph
            layer = self.layer(LayerSpec.from_tensors(call.layer_key, q), q.device)
            return self._forward_torch(q, k, v, call, mask, layer, finite_flag)
        layer = self.layers.get(call.layer_key)
        if layer is None or layer.alpha_logit.device != q.device:  # type: ignore[union-attr]
            layer = self.layer(LayerSpec.from_tensors(call.layer_key, q), q.device)
        assert isinstance(layer, TtrLayer)
        keep = None
        if mask is not None:
            keep = key_padding(mask, q.shape[2], k.shape[2])
            if keep is None:  # a mask that varies per query: the PyTorch path reports it
                return self._forward_torch(q, k, v, call, mask, layer, finite_flag)
            keep = served_key_padding(keep, k.shape[0])
        signature = layer.weights_signature()
        served = self._served(layer, signature, q, k, v, call, mask, keep)
        if served.plan is not None:
            out = self._run_plan(served.plan, layer, signature, q, k, v, call, keep, finite_flag)
            if out is not None:
                return out
        elif served.reasons and self.settings.kernel == "triton":
            raise ValueError(f"ttr {call.layer_key}: kernel = 'triton' but the fused path cannot serve this call: "
                             + "; ".join(served.reasons))
        return self._forward_torch(q, k, v, call, mask, layer, finite_flag)

    def _serve_sharded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                       finite_flag: torch.Tensor | None) -> torch.Tensor:
        """A sequence-parallel call: the fused kernels for the local work where they serve (`parallel_fused.py`,
        the same verdict as a single-process call: CUDA, bf16/fp16 under 'auto'), else the PyTorch path
        (`parallel.sharded_forward`)."""
        layer = self.layer(LayerSpec.from_tensors(call.layer_key, q), q.device)
        assert isinstance(layer, TtrLayer) and not isinstance(layer, JointLayer)
        residual = self.residual()
        if residual is not None and not isinstance(residual, ShardedResidualBranch):
            raise ValueError(f"ttr {call.layer_key}: residual backend {self.settings.landmark_backend!r} has no "
                             "sharded_branch() for a sequence-parallel call")
        signature = layer.weights_signature()
        plan, reasons = self._sharded_plan(layer, signature, q, k, v, call, residual)
        if plan is not None:  # a failure raises: every rank must take the same path (the collectives pair up)
            return plan(q, k, v, self._affine(layer, signature, call, q), finite_flag)
        if reasons and self.settings.kernel == "triton":
            raise ValueError(f"ttr {call.layer_key}: kernel = 'triton' but the fused path cannot serve this "
                             "sequence-parallel call: " + "; ".join(reasons))
        fdtype = q.dtype if self.settings.feature_precision == "input" and q.device.type != "cpu" else torch.float32
        kc, qc = self.layer_chunks(call.layer_key)
        out = sharded_forward(layer, q, k, v, call, residual, kc, qc, self.settings.eps, fdtype).to(q.dtype)
        return out if finite_flag is None else guard_rows(out, finite_flag)

    def _sharded_plan(self, layer: TtrLayer, signature: tuple[int, ...] | None, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, call: AttentionCall,
                      residual: ShardedResidualBranch | None) -> tuple["ShardedPlan | None", tuple[str, ...]]:
        """The cached fused plan of a sharded call shape, or None with the reasons it cannot serve (empty where the
        PyTorch path is simply the configured one)."""
        mode = self.settings.kernel
        if mode == "torch" or (mode == "auto" and (q.device.type != "cuda" or q.dtype == torch.float32)):
            return None, ()
        assert call.shard is not None
        cache = layer.serve_cache
        cached = cache.valid_for(signature, self.settings)
        key = (shard_layout(call.shard), q.shape, k.shape, v.shape, q.dtype, q.device, call.latent_grid,
               layer.running_reference() is not None)
        entry = cache.entries.get(key) if cached else None
        if entry is None:
            entry = self._build_sharded(layer, q, k, v, call, residual)
            if signature is not None:
                cache.entries[key] = entry
        return entry.plan, entry.reasons  # type: ignore[return-value]

    def _build_sharded(self, layer: TtrLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                       residual: ShardedResidualBranch | None) -> _Served:
        from .kernels import PhiWeights, fused_unsupported_reasons  # no triton import here

        eps = self.settings.eps
        phi_q = PhiWeights.from_module(layer.phi_q, layer.activation, layer.l2_norm, eps)
        phi_k = PhiWeights.from_module(layer.phi_k, layer.activation, layer.l2_norm, eps) \
            if layer.phi_k is not None else phi_q
        with torch.no_grad():  # the local work's shapes; the key mask of replicated text is the key pass's alone
            reasons = fused_unsupported_reasons(q, k, v, phi_q, phi_k)
            if reasons:
                return _Served(None, tuple(reasons))
            main = self.residual()
            if main is not None and main.precision == "fp8":
                self._warn_fp8_once("on sequence-parallel calls")
            return _Served(ShardedPlan(layer, q, k, v, call, residual, eps))  # type: ignore[arg-type]

    def _affine(self, layer: TtrLayer, signature: tuple[int, ...] | None, call: AttentionCall,
                q: torch.Tensor) -> torch.Tensor | None:
        """The σ/CFG conditioner's `[B, 4]` branch affine for a fused call (from the step's bank), or None."""
        cond = layer.condition_key(call)
        if cond is None:
            return None
        if signature is None:  # nothing may be cached: this layer's own conditioner, now
            return layer.condition(call, q.device).detach().expand(q.shape[0], 4).contiguous()  # type: ignore[union-attr]
        return self.conditioner_bank.affine(self.layers, call.layer_key, signature, cond[0], cond[1], q.shape[0],
                                            q.device)

    def _served(self, layer: TtrLayer, signature: tuple[int, ...] | None, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, call: AttentionCall, mask: torch.Tensor | None,
                keep: torch.Tensor | None) -> _Served:
        """The cached verdict for this call shape (built on first use, and again after the weights change)."""
        cache = layer.serve_cache
        cached = cache.valid_for(signature, self.settings)
        key = (q.shape, k.shape, v.shape, q.dtype, q.device, keep is not None,
               call.n_cond_tokens, call.latent_grid, layer.running_reference() is not None)
        entry = cache.entries.get(key) if cached else None
        if entry is None:
            entry = self._build_served(layer, q, k, v, call, mask if keep is not None else None, keep)
            if signature is not None:
                cache.entries[key] = entry
        return entry

    def _build_served(self, layer: TtrLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                      mask: torch.Tensor | None, keep: torch.Tensor | None) -> _Served:
        mode = self.settings.kernel
        if mode == "torch" or (mode == "auto" and (q.device.type != "cuda" or q.dtype == torch.float32
                                                   or call.layer_key in self._fused_failed)):
            # 'auto' keeps fp32 on the PyTorch path (the kernels are tuned for bf16/fp16)
            return _Served(None)
        from .kernels import PhiWeights, ServePlan, fused_unsupported_reasons  # no triton import here

        eps = self.settings.eps
        phi_q = PhiWeights.from_module(layer.phi_q, layer.activation, layer.l2_norm, eps)
        phi_k = PhiWeights.from_module(layer.phi_k, layer.activation, layer.l2_norm, eps) \
            if layer.phi_k is not None else phi_q
        if isinstance(layer, JointLayer):
            return self._build_joint_served(layer, phi_q, phi_k, q, k, v, call, mask, keep)
        residual = self.residual()
        idx = None
        window, grid, n_cond = 0, None, 0
        reasons: list[str] = []
        if residual is not None:
            # the residual's own decision (and its warning, once): the fused window serves exactly where its branch
            # would; where the window cannot apply (no grid, a grid that does not hold the image tokens) its branch
            # uses the landmarks only, and so do the kernels (window 0)
            window, grid = residual.window_plan(q, k, call)
            n_cond = call.cond_in(k.shape[2]) if window else 0
            idx, valid = residual.indices(k, call, mask)
            if valid is not None:
                reasons.append("per-batch landmark sets (key padding with landmarks)")
        if not reasons:
            with torch.no_grad():
                reasons = fused_unsupported_reasons(q, k, v, phi_q, phi_k, keep, idx, window)
        if reasons:
            return _Served(None, tuple(reasons))
        with torch.no_grad():
            plan = ServePlan(q, k, v, phi_q, phi_k, landmark_idx=idx, alpha_logit=layer.alpha_logit.detach(),
                             alpha_max=layer.alpha_max, gamma=layer.gamma, adaptive=layer.adaptive, eps=eps,
                             key_mask=keep is not None, window=window, grid=grid, n_cond=n_cond,
                             d_reference=layer.running_reference(), landmark_prefix=call.cond_in(k.shape[2]),
                             exact_fp8=residual is not None and self.exact_fp8(residual, q.device))
        return _Served(plan)

    def _build_joint_served(self, layer: JointLayer, phi_q: Any, phi_k: Any, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, call: AttentionCall, mask: torch.Tensor | None,
                            keep: torch.Tensor | None) -> _Served:
        """A joint layer's verdict: a `JointServePlan` over the landmark backend's exact set (its landmarks hold
        every text key; its window decision), or the PyTorch path with the reasons."""
        from .kernels import JointServePlan, fused_unsupported_reasons, joint_unsupported_reasons

        reasons = joint_unsupported_reasons(layer.combine, layer.log_scale_kind, q.shape[2], k.shape[2],
                                            keep is not None)
        residual = self.residual()
        if residual is None or self.exact_attention_fn() is None:
            return _Served(None, tuple(reasons + ["no landmark backend with exact_attention()"]))
        if reasons:
            return _Served(None, tuple(reasons))
        window, grid = residual.window_plan(q, k, call)
        idx, _ = residual.indices(k, call, mask)
        n_cond = call.cond_in(k.shape[2])  # the text rows, and the landmarks' leading rows (text first)
        with torch.no_grad():
            reasons = fused_unsupported_reasons(q, k, v, phi_q, phi_k, None, idx, window)
            if reasons:
                return _Served(None, tuple(reasons))
            plan = JointServePlan(q, k, v, phi_q, phi_k, landmark_idx=idx, alpha_logit=layer.alpha_logit.detach(),
                                  log_scale_q=layer.log_scale_q.detach(), eps=self.settings.eps, window=window,
                                  grid=grid, n_cond=n_cond, landmark_prefix=n_cond,
                                  exact_fp8=self.exact_fp8(residual, q.device))
        return _Served(plan)

    def _run_plan(self, plan: "ServePlan", layer: TtrLayer, signature: tuple[int, ...] | None, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, call: AttentionCall, keep: torch.Tensor | None,
                  finite_flag: torch.Tensor | None) -> torch.Tensor | None:
        """One fused call; None when the kernels failed (this layer then takes the PyTorch path from now on)."""
        try:
            affine = self._affine(layer, signature, call, q)
            out = plan(q, k, v, key_mask=keep, branch_affine=affine, finite_flag=finite_flag)
        except Exception as exc:  # noqa: BLE001 - e.g. Triton out of resources: the PyTorch path still serves
            if self.settings.kernel == "triton" or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            self._fused_failed.add(call.layer_key)
            layer.serve_cache.valid_for(None, None)
            log.warning("attnplug: ttr %s: fused kernels failed (%s: %s); this layer uses the PyTorch path from "
                        "now on", call.layer_key, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        if layer.last_metrics:  # the fused path computes no per-call statistics (assigned only when there were some:
            layer.last_metrics = {}  # an nn.Module attribute write costs a served call µs)
        return out

    def _forward_torch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                       mask: torch.Tensor | None, layer: TtrLayer, finite_flag: torch.Tensor | None) -> torch.Tensor:
        """The PyTorch path at inference (`feature_precision` decides φ's dtype on a GPU)."""
        fdtype = torch.float32
        if self.settings.feature_precision == "input" and q.device.type != "cpu":
            fdtype = q.dtype
        with torch.no_grad():
            out = self._run(q, k, v, call, mask, layer, fdtype).to(q.dtype)
        return out if finite_flag is None else guard_rows(out, finite_flag)

    def invalidate_plans(self) -> None:
        """Drop every cached serve plan and conditioner row (they are rebuilt at the next call). Changes of the
        weights are seen without this (`TtrLayer.weights_signature`); changes made around it (a settings object
        edited in place) are not."""
        for layer in self.layers.values():
            if isinstance(layer, TtrLayer):
                layer.serve_cache.valid_for(None, None)
        self.conditioner_bank.clear()

    def release(self) -> None:
        self.invalidate_plans()  # plans hold device tensors (casts, indices)
        super().release()

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
        conditioner. Joint layers raise NotImplementedError (which rows are text queries is unknown for a bare
        query subset; the distiller then skips these metrics).
        """
        layer = self._module(layer_key)
        if isinstance(layer, JointLayer):
            raise NotImplementedError(f"ttr {layer_key}: attention_weights of a joint layer")
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
            residual = self.residual()
            if residual is not None:
                weights = self._blend_landmark_rows(layer, weights, q32, k32, *residual.indices(k, call, mask))
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
        residual = self.residual()
        if residual is not None:
            lm = residual.memory_estimate(q, k, v, call, training)
            blend = b * h * nq * (dv * 2 + 3) * 4  # difference, blended result, d / d_norm / α
            total += lm + blend
        if q.dtype != torch.float32:
            total += b * h * (min(qc, nq) + min(kc, nk)) * (d + dv) * 4  # fp32 copies of chunks
        if self.settings.variant_for(call.layer_key) == "joint":
            window = getattr(getattr(residual, "settings", None), "window", 0) if residual is not None else 0
            total += joint_extra_bytes(b, h, nq, nk, dv, f, (2 * window + 1) ** 2 if window else 0, qc, training)
        return int(total)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return _state.backend_state(self)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        _state.load_backend_state(self, tensors, meta)

    def prepare_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> StagedState:
        return _state.prepare_backend_state(self, tensors, meta)

    def landmark_settings(self) -> dict[str, Any] | None:
        """Settings of the landmark backend in use (recorded in checkpoints), or None (kernel-only)."""
        residual = self.residual()
        return None if residual is None else residual.settings.model_dump()


def _as_residual(landmark: "ResidualBranch | LandmarkBranch | None") -> ResidualBranch | None:
    """A residual branch given to the constructor: the object itself, or the object whose bound `branch` method
    was given."""
    if landmark is None or isinstance(landmark, ResidualBranch):
        return landmark
    owner = getattr(landmark, "__self__", None)
    if isinstance(owner, ResidualBranch) and getattr(landmark, "__name__", "") == "branch":
        return owner
    raise TypeError(f"ttr: landmark must be a ResidualBranch (e.g. a LandmarkBackend) or its bound branch method, "
                    f"got {type(landmark).__name__}" + (f" ({', '.join(residual_problems(landmark))})"
                                                         if not callable(landmark) else ""))
