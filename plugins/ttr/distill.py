"""The online distiller: trains a learned backend's layers from the model's own exact attention.

Generic over learned backends (`core.backend.LearnedBackend` and its training contract); the student
is found by name in `session.backends` (`student = "ttr"` by default).

Data flow (teacher → replay → update → EMA → gate):
1. `step_start` draws this step's training set (seeded; `distill_select`). `wants(call)` says whether
   a call's layer is in it; the session then computes the exact output (the teacher) and calls
   `observe`.
2. `observe` subsamples the *queries* (seeded, `query_cap` per layer) and keeps the full K/V; it stores
   a cloned sample in the replay (`replay`: fp16 on CPU by default, one global byte budget).
3. It runs `train_steps_per_call` updates, each on a random replay sample of the layer
   (`distill_train`: Kendall-weighted Smooth-L1 + cosine distance, per-layer AdamW), inside
   `inference_mode(False)` + `enable_grad()`.
4. Each update's loss and cosine distance go into the layer's per-run accumulators; `run_end` folds
   their run means into the EMA once per run (`readiness`; fallbacks: a sigma jump, or a periodic
   flush when the host reports neither steps nor sigmas).
5. Readiness (hysteresis on the EMA cosine distance) is mirrored into `student.ready`, and the
   router's cache is invalidated; the router then serves ready layers with the student when the
   config's backend is the student (after training, or in `mode = "preview"`), and sends every other
   layer to exact attention (fail-closed).

Out of memory while training a layer halves its query cap and the backend's chunk sizes (optional
`shrink_training_memory(layer_key)`, else `layer_chunks`/`set_layer_chunks`), clears the layer's
replay, and stops training the layer when nothing is left to shrink. Sampling never stops because of it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Collection, Literal, Mapping

import torch
from pydantic import Field, field_validator, model_validator

from ...core.backend import LearnedBackend, StagedState
from ...core.call import AttentionCall, LayerSpec
from ...core.config import SEED_MAX, SEED_MIN, CheckContext, Strict
from ...core.masks import key_padding
from ...core.patterns import validate_layer_pattern
from .distill_metrics import (
    attention_metrics,
    cross_layer_snapshot,
    exact_rows,
    output_metrics,
    sample_queries,
)
from .distill_select import LayerSelector
from .distill_state import STATE_FORMAT, STATE_VERSION, DistillerSnapshot, parse_state
from .distill_train import LayerTrainer, OptimConfig, TrainSync
from .readiness import LayerReadiness, ReadinessRule
from .replay import ReplayBuffer, ReplaySample, storage_copies

if TYPE_CHECKING:
    from ...core.registrar import Registrar
    from ...core.session import RunInfo, Session

log = logging.getLogger("attnplug")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SNAPSHOT_KEYS = (
    "loss",
    "cos_dist",
    "ema_cos",
    "ema_loss",
    "nmse",
    "cos_mean",
    "cos_p5",
    "rel_l2_p95",
    "rel_l2_p99",
    "attn_kl",
    "attn_topk",
    "alpha_mean",
    "logvar_huber",
    "logvar_cos",
)


class DistillSettings(Strict):
    """Settings of the online distiller (config section `[plugins.distill]`)."""

    student: str = Field("ttr", description="Name of the learned backend to train.")
    layers: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Layer patterns that may train ('single:*', 'double:0', 'single:3-5').",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Layer patterns that never train (wins over layers)."
    )
    min_swap_layers: int = Field(1, ge=0, description="Fewest layers trained per step.")
    max_swap_layers: int = Field(
        -1, ge=-1, description="Most layers trained per step (-1: all eligible layers)."
    )
    query_cap: int = Field(512, ge=1, description="Queries subsampled per training call (K/V stay full).")
    train_steps_per_call: int = Field(
        1,
        ge=0,
        le=32,
        description="Optimizer updates per training call (0: only collect replay, for an offline "
        "fit with `fit_replay`).",
    )
    replay_per_layer: int = Field(8, ge=1, description="Replay samples kept per layer.")
    replay_max_mb: float = Field(
        768.0, gt=0, description="Global replay budget in MiB (all layers together)."
    )
    replay_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Replay storage dtype."
    )
    replay_offload_cpu: bool = Field(
        True, description="Keep replay on the CPU (else on the training device)."
    )
    save_replay: bool = Field(
        False,
        description="Write the replay samples into checkpoints (large; makes a "
        "resumed run continue exactly).",
    )
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the feature maps ('phi' group).")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="Per-layer learning-rate schedule over the layer's updates: 'constant', or "
        "'cosine' decay from lr to lr * lr_min_ratio over lr_decay_updates, then constant.",
    )
    lr_decay_updates: int = Field(
        1500, ge=1, description="Updates of a layer over which the 'cosine' schedule decays."
    )
    lr_min_ratio: float = Field(
        0.05, ge=0, le=1, description="Final learning rate of the 'cosine' schedule, as a share of lr."
    )
    alpha_lr_mult: float = Field(5.0, ge=0, description="Learning rate of the 'alpha' group = lr * this.")
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay of 'phi' ('alpha' and log-vars: none)."
    )
    lr_logvar: float = Field(1e-3, gt=0, description="AdamW learning rate of the Kendall log-variances.")
    grad_clip: float = Field(
        1.0, ge=0, description="Global-norm gradient clip of a layer's parameters (0: off)."
    )
    huber_beta: float = Field(0.05, gt=0, description="Smooth-L1 beta.")
    logvar_init_huber: float = Field(0.0, description="Initial log-variance of the Smooth-L1 term.")
    logvar_init_cos: float = Field(-1.0, description="Initial log-variance of the cosine term.")
    readiness_threshold: float = Field(
        0.12, gt=0, description="EMA cosine distance at or below which a layer becomes ready."
    )
    readiness_min_updates: int = Field(
        24, ge=0, description="Updates a layer needs before it can become ready."
    )
    readiness_exit_factor: float = Field(
        1.2,
        ge=1.0,
        description="A ready layer stays ready until its EMA cosine distance exceeds threshold * this.",
    )
    ema_decay: float = Field(0.9, ge=0, lt=1, description="EMA decay per flush (per sampling run).")
    sigma_jump: float = Field(
        1.5,
        gt=1.0,
        description="Fallback run boundary: flush when sigma rises above this "
        "factor times the previous step's sigma.",
    )
    flush_every: int = Field(
        20,
        ge=0,
        description="Fallback: flush a layer after this many updates when the run "
        "reports neither step indices nor sigmas (0: never).",
    )
    oom_min_query_cap: int = Field(
        32, ge=1, description="Out of memory halves a layer's query cap down to this."
    )
    oom_min_key_chunk: int = Field(
        256,
        ge=1,
        description="Out of memory halves the backend's key chunk down to "
        "this (backends with layer_chunks/set_layer_chunks).",
    )
    oom_min_query_chunk: int = Field(
        64, ge=1, description="Out of memory halves the backend's query chunk down to this."
    )
    log_every: int = Field(
        20, ge=0, description="Cross-layer snapshot every N updates (scope 'distill'; 0: off)."
    )
    layer_log_every: int = Field(
        10, ge=0, description="Per-layer metrics every N updates of a layer (scope 'distill/layer'; 0: off)."
    )
    metric_queries: int = Field(16, ge=1, description="Queries per metric tick for attention KL / top-k.")
    metric_top_k: int = Field(16, ge=1, description="k of the attention top-k overlap.")
    seed: int | None = Field(
        None,
        ge=SEED_MIN,
        le=SEED_MAX,
        description="Seed of layer sets, query subsets and replay draws (None: the config's root seed); a "
        "64-bit signed integer.",
    )

    @field_validator("layers", "exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return [validate_layer_pattern(p) for p in v]

    def check_semantics(self, ctx: CheckContext, section: str) -> None:
        ctx.backend(section, "student", self.student, learned=True)
        ctx.layer_patterns(section, "layers", self.layers)
        ctx.layer_patterns(section, "exclude", self.exclude)

    @model_validator(mode="after")
    def _swap_order(self) -> DistillSettings:
        if self.max_swap_layers >= 0 and self.min_swap_layers > self.max_swap_layers:
            raise ValueError(
                f"min_swap_layers ({self.min_swap_layers}) must not exceed max_swap_layers "
                f"({self.max_swap_layers}; -1 = all)"
            )
        return self

    def rule(self) -> ReadinessRule:
        return ReadinessRule(
            self.readiness_threshold, self.readiness_min_updates, self.readiness_exit_factor, self.ema_decay
        )

    def optim(self) -> OptimConfig:
        return OptimConfig(
            self.lr,
            self.alpha_lr_mult,
            self.weight_decay,
            self.lr_logvar,
            self.grad_clip,
            self.huber_beta,
            (self.logvar_init_huber, self.logvar_init_cos),
            self.lr_schedule,
            self.lr_decay_updates,
            self.lr_min_ratio,
        )


#: How allocation failures read: CUDA ("CUDA out of memory"), the CPU allocator ("DefaultCPUAllocator: can't
#: allocate memory"), MPS and others ("not enough memory").
_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


def _is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure on any device (then the distiller shrinks, then disables)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OOM_TEXT)


class OnlineDistiller:
    """The `core.distiller.Distiller` of attnplug: see the module docstring for the data flow."""

    def __init__(self, settings: DistillSettings, session: Session, name: str = "ttr") -> None:
        self.name = name
        self.settings = settings
        self.session = session
        student = session.backends.get(settings.student) if settings.student in session.backends else None
        if student is None:
            raise ValueError(
                f"distiller {name!r}: student backend {settings.student!r} is not registered "
                f"(backends: {session.backends.names()}); set [plugins.distill] student"
            )
        if not isinstance(student, LearnedBackend):
            raise TypeError(f"distiller {name!r}: backend {settings.student!r} is not a learned backend")
        self.student: LearnedBackend = student
        seed = settings.seed if settings.seed is not None else session.config.root.seed
        self.rng = torch.Generator().manual_seed(int(seed))
        self.rule = settings.rule()
        self.optim = settings.optim()
        self.selector = LayerSelector(
            settings.layers, settings.exclude, settings.min_swap_layers, settings.max_swap_layers
        )
        self.replay = ReplayBuffer(int(settings.replay_max_mb * 2**20), settings.replay_per_layer)
        self.storage_dtype = _DTYPES[settings.replay_dtype]
        self.readiness: dict[str, LayerReadiness] = {}
        self.trainers: dict[str, LayerTrainer] = {}
        #: data-parallel distillation (`distill_parallel.DataParallel`): where the ranks meet in an update
        self.sync: TrainSync | None = None
        self.query_caps: dict[str, int] = {}
        self.oom_events: Counter[str] = Counter()
        self.shrinks: dict[str, list[dict[str, Any]]] = {}
        self.metrics: dict[str, dict[str, float]] = {}  # latest per-layer metrics (snapshots read these)
        self.flush_counts: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.total_updates = 0
        self._pending_opt: dict[str, dict[str, torch.Tensor]] = {}
        self._last_sigma: float | None = None
        self._run_structured = False

    # ---- Distiller protocol ----------------------------------------------------------------------
    def wants(self, call: AttentionCall) -> bool:
        """Whether `call`'s layer is in this step's training set (cheap: set lookups)."""
        return self.selector.wants(call.layer_key)

    def step_start(self, step_index: int | None, sigma: float | None) -> None:
        """New step: sigma-jump fallback flush, then draw the step's training set."""
        if (step_index is not None and step_index >= 0) or sigma is not None:
            self._run_structured = True
        if (
            sigma is not None
            and self._last_sigma is not None
            and sigma > self.settings.sigma_jump * self._last_sigma
        ):
            self.flush("sigma_jump")
        if sigma is not None:
            self._last_sigma = sigma
        self.selector.draw(self.rng)

    def run_start(self, run: RunInfo) -> None:
        self._last_sigma = None
        self._run_structured = False

    def run_end(self, run: RunInfo) -> None:
        """Fold this run's accumulators into the EMAs (once per run) and log a snapshot."""
        self.flush("run_end")
        self._last_sigma = None

    def observe(
        self,
        call: AttentionCall,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        teacher: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> None:
        """Store a query-subsampled sample (full K/V) and train the layer on replay."""
        key = call.layer_key
        if key in self.selector.disabled:
            return
        kp = None
        if mask is not None:
            kp = key_padding(mask, q.shape[2], k.shape[2])
            if kp is None:
                self.skipped["full_mask"] += 1
                self.session.warn_once(
                    key,
                    "distill-mask",
                    f"distiller: {key} has a per-query attention mask; "
                    "calls with such masks are not trained on",
                )
                return
        device = q.device
        fresh: ReplaySample | None = None
        try:
            self.student.layer(LayerSpec.from_tensors(key, q), device)
            trainer = self._trainer(key, device)
            fresh = self._capture(call, q, k, v, teacher, kp, device)
            stored = self.replay.push(fresh)
            if not stored:
                self.session.warn_once(
                    key,
                    "distill-replay-size",
                    f"distiller: a sample of {key} "
                    f"({fresh.nbytes / 2**20:.1f} MiB) exceeds replay_max_mb; trained on, not kept",
                )
            for _ in range(self.settings.train_steps_per_call):
                sample = self.replay.choose(key, self.rng) if stored else fresh
                assert sample is not None
                self._update(key, trainer, sample, device)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            self._on_oom(key, exc)
        finally:
            if fresh is not None:
                fresh.live = None
        if self.settings.flush_every and not self._run_structured:
            r = self.readiness.get(key)
            if r is not None and r.run_count >= self.settings.flush_every:
                self.flush("periodic", [key])

    def _capture(
        self,
        call: AttentionCall,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        teacher: torch.Tensor,
        kp: torch.Tensor | None,
        device: torch.device,
    ) -> ReplaySample:
        key = call.layer_key
        nq = q.shape[2]
        cap = self.query_caps.setdefault(key, self.settings.query_cap)
        idx = None if nq <= cap else torch.randperm(nq, generator=self.rng)[:cap].sort().values.to(q.device)
        store_dev = torch.device("cpu") if self.settings.replay_offload_cpu else device
        with torch.inference_mode(False):
            live = {
                "q": (q if idx is None else q.index_select(2, idx)).to(torch.float32, copy=True),
                "k": k.to(torch.float32, copy=True),
                "v": v.to(torch.float32, copy=True),
                "teacher": (teacher if idx is None else teacher.index_select(2, idx)).to(
                    torch.float32, copy=True
                ),
                "mask": None if kp is None else kp.to(device=device, copy=True),
            }
            if self.storage_dtype == torch.float32 and store_dev == device:
                parts = {n: live[n] for n in ("q", "k", "v", "teacher", "mask")}
            else:
                parts = storage_copies(live, self.storage_dtype, store_dev)
        return ReplaySample(
            key, parts["q"], parts["k"], parts["v"], parts["teacher"], parts["mask"], call,
            query_index=None if idx is None else idx.cpu(), live=live,
        )

    def _trainer(self, key: str, device: torch.device) -> LayerTrainer:
        trainer = self.trainers.get(key)
        if trainer is None:
            trainer = self.trainers[key] = LayerTrainer(key, self.student, self.optim, device, self.sync)
            pending = self._pending_opt.pop(key, None)
            if pending is not None:
                try:
                    trainer.load_flat_state(pending)
                except ValueError as exc:
                    log.warning(
                        "attnplug: distiller: optimizer state of %s from the checkpoint does not fit the "
                        "layer (%s); starting a fresh optimizer",
                        key,
                        exc,
                    )
                    trainer = self.trainers[key] = LayerTrainer(key, self.student, self.optim, device, self.sync)
        trainer.ensure_trainable(self.student)
        return trainer

    def _update(self, key: str, trainer: LayerTrainer, sample: ReplaySample, device: torch.device) -> None:
        tensors = sample.tensors(device)
        loss, cos, out = trainer.update(self.student, tensors, sample.call)
        r = self.readiness.setdefault(key, LayerReadiness())
        if not (math.isfinite(loss) and math.isfinite(cos)):
            self.skipped["non_finite_loss"] += 1
            self.session.warn_once(
                key, "distill-nonfinite", f"distiller: non-finite loss on {key}; update skipped"
            )
            return
        r.record(loss, cos)
        self.total_updates += 1
        m = self.metrics.setdefault(key, {})
        m.update(loss=loss, cos_dist=r.last_cos or 0.0, updates=float(r.updates))
        every = self.settings.layer_log_every
        if every and r.updates % every == 0:
            self._layer_metrics(key, trainer, tensors, out, sample.call)
        if self.settings.log_every and self.total_updates % self.settings.log_every == 0:
            self.snapshot()

    def fit_replay(self, updates_per_layer: int, flushes: int = 20) -> int:
        """Offline fit: train each layer with replay samples for `updates_per_layer` more updates, each on
        a random sample of its replay (same loss, optimizer and lr schedule as online), folding the
        readiness EMA `flushes` times along the way. Returns the number of updates made.

        With `train_steps_per_call = 0` and a replay large enough to keep every sample, sampling only
        collects the model's attention and this fits it afterwards: the offline baseline the online
        distiller is compared against (docs/QUALITY.md)."""
        made = 0
        every = max(1, updates_per_layer // max(flushes, 1))
        for key in list(self.trainers):
            if key in self.selector.disabled or not self.replay.layer(key):
                continue
            trainer = self.trainers[key]
            device = trainer.params[0].device
            try:
                for i in range(updates_per_layer):
                    sample = self.replay.choose(key, self.rng)
                    assert sample is not None
                    self._update(key, trainer, sample, device)
                    made += 1
                    if (i + 1) % every == 0:
                        self.flush("fit_replay", [key])
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                self._on_oom(key, exc)
            self.flush("fit_replay", [key])
        return made

    # ---- metrics ---------------------------------------------------------------------------------
    def _layer_metrics(
        self, key: str, trainer: LayerTrainer, tensors: dict[str, Any], out: torch.Tensor, call: AttentionCall
    ) -> None:
        """Full per-layer metrics on the update just made (see distill_metrics), logged to 'distill/layer'."""
        with torch.inference_mode(False), torch.no_grad():
            m = output_metrics(out, tensors["teacher"])
            sel = sample_queries(tensors["q"].shape[2], self.settings.metric_queries, self.rng).to(out.device)
            qs = tensors["q"].index_select(2, sel)
            exact = exact_rows(qs, tensors["k"], tensors["mask"])
            weights_fn = getattr(self.student, "attention_weights", None)
            student_rows = None
            if callable(weights_fn):
                try:
                    student_rows = weights_fn(key, qs, tensors["k"], call, tensors["mask"])
                except NotImplementedError:
                    student_rows = None
            m.update(attention_metrics(exact, student_rows, self.settings.metric_top_k))
            lv = trainer.logvars.detach().tolist()
        m.update(logvar_huber=lv[0], logvar_cos=lv[1])
        for name, value in (self.student.layer_metrics(key) or {}).items():
            m[name] = float(value)
        r = self.readiness[key]
        m.update(
            ema_cos=r.ema_cos if r.ema_cos is not None else float("nan"),
            ema_loss=r.ema_loss if r.ema_loss is not None else float("nan"),
            ready=float(r.ready),
            query_cap=float(self.query_caps.get(key, self.settings.query_cap)),
        )
        self.metrics.setdefault(key, {}).update(m)
        self.session.loggers.log_metrics(
            {"layer": key, **self.metrics[key]}, self.total_updates, "distill/layer"
        )

    def snapshot(self, reason: str = "updates") -> dict[str, Any]:
        """Cross-layer quantiles of the latest per-layer metrics, ready-layer count; logged to 'distill'."""
        per_layer = {}
        for key, m in self.metrics.items():
            r = self.readiness.get(key)
            merged = dict(m)
            if r is not None:
                merged.update(ema_cos=r.ema_cos, ema_loss=r.ema_loss)
            per_layer[key] = merged
        ready = [k for k, r in self.readiness.items() if r.ready]
        worst_ready = max((self.readiness[k].ema_cos or 0.0) for k in ready) if ready else 1.0
        snap: dict[str, Any] = {
            "reason": reason,
            "updates": self.total_updates,
            "layers_tracked": len(self.readiness),
            "ready_layers": len(ready),
            "ready_score": len(ready) * (1.0 - worst_ready),
            "disabled_layers": len(self.selector.disabled),
            "replay_mb": self.replay.bytes_used / 2**20,
            "replay_samples": len(self.replay),
            "oom_events": sum(self.oom_events.values()),
            **cross_layer_snapshot(per_layer, _SNAPSHOT_KEYS),
        }
        self.session.loggers.log_metrics(snap, self.total_updates, "distill")
        return snap

    # ---- readiness -------------------------------------------------------------------------------
    def flush(self, reason: str, layers: list[str] | None = None) -> bool:
        """Fold accumulators into EMAs (all layers, or `layers`); mirror readiness into the student and
        invalidate the router's cache when a flag changed. Returns whether anything was flushed."""
        keys = list(self.readiness) if layers is None else layers
        flushed: list[str] = []
        changed = False
        for key in keys:
            r = self.readiness.get(key)
            if r is None or r.run_count == 0:
                continue
            flushed.append(key)
            changed |= r.flush(self.rule)
            self.student.ready[key] = r.ready
        if flushed:
            self.flush_counts[reason] += 1
            for key in flushed:  # the readiness gate's inputs per layer, at every flush (scope 'distill/readiness')
                r = self.readiness[key]
                self.session.loggers.log_metrics({"layer": key, "updates": r.updates, "ema_cos": r.ema_cos,
                                                  "ema_loss": r.ema_loss, "ready": float(r.ready)},
                                                 self.total_updates, "distill/readiness")
            self.snapshot(reason)
        if changed:
            self.session.router.invalidate()
        return bool(flushed)

    def _mirror_readiness(self) -> None:
        for key, r in self.readiness.items():
            self.student.ready[key] = r.ready
        self.session.router.invalidate()

    # ---- out of memory ---------------------------------------------------------------------------
    def _on_oom(self, key: str, exc: BaseException) -> None:
        """Shrink the layer's query cap and the backend's chunks (sticky); stop training it at the floor."""
        trainer = self.trainers.get(key)
        if trainer is not None:
            trainer.opt.zero_grad(set_to_none=True)
            trainer.logvar_opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.oom_events[key] += 1
        cap = self.query_caps.get(key, self.settings.query_cap)
        new_cap = max(min(self.settings.oom_min_query_cap, cap), cap // 2)
        shrunk = new_cap < cap
        self.query_caps[key] = new_cap
        result = self._shrink_chunks(key)
        if result:
            self.shrinks.setdefault(key, []).append(result)
            shrunk = True
        self.replay.clear_layer(key)
        if shrunk:
            self.session.warn_once(
                key,
                "distill-oom",
                f"distiller: out of memory training {key}; query cap "
                f"{cap} -> {new_cap}, chunks shrunk, replay cleared (sticky; sampling goes on)",
            )
        else:
            self.selector.disabled.add(key)
            self.selector.current.discard(key)
            self.session.warn_once(
                key,
                "distill-oom-off",
                f"distiller: out of memory training {key} with nothing "
                f"left to shrink; training of {key} stopped (sampling goes on): {exc}",
            )

    def _shrink_chunks(self, key: str) -> dict[str, Any] | None:
        """Ask the backend for smaller chunks of one layer: its `shrink_training_memory(layer_key)` when
        it has one (returns what changed, or None at its floor), else halve `layer_chunks(layer_key)`
        → `set_layer_chunks(layer_key, key_chunk, query_chunk)` down to the configured floors."""
        shrink = getattr(self.student, "shrink_training_memory", None)
        if callable(shrink):
            result = shrink(key)
            return (dict(result) if isinstance(result, dict) else {"shrunk": True}) if result else None
        get, put = (
            getattr(self.student, "layer_chunks", None),
            getattr(self.student, "set_layer_chunks", None),
        )
        if not (callable(get) and callable(put)):
            return None
        kc, qc = (int(x) for x in get(key))
        new_kc = max(min(kc, self.settings.oom_min_key_chunk), kc // 2)
        new_qc = max(min(qc, self.settings.oom_min_query_chunk), qc // 2)
        if (new_kc, new_qc) == (kc, qc):
            return None
        put(key, new_kc, new_qc)
        return {"key_chunk": new_kc, "query_chunk": new_qc}

    # ---- state -----------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (RNG, optimizer states, log-vars, optionally replay) and JSON meta (see module docs)."""
        tensors: dict[str, torch.Tensor] = {"rng": self.rng.get_state()}
        layer_keys = sorted(
            set(self.readiness)
            | set(self.trainers)
            | set(self.query_caps)
            | set(self._pending_opt)
            | set(self.selector.disabled)
        )
        layers_meta: list[dict[str, Any]] = []
        for i, key in enumerate(layer_keys):
            trainer = self.trainers.get(key)
            flat = trainer.flat_state() if trainer is not None else self._pending_opt.get(key, {})
            for name, t in flat.items():
                tensors[f"layer{i}/{name}"] = t
            layers_meta.append(
                {
                    "layer_key": key,
                    "readiness": (self.readiness.get(key) or LayerReadiness()).to_json(),
                    "query_cap": self.query_caps.get(key, self.settings.query_cap),
                    "oom_events": self.oom_events.get(key, 0),
                    "shrinks": self.shrinks.get(key, []),
                    "disabled": key in self.selector.disabled,
                    "param_shapes": trainer.param_shapes() if trainer is not None else None,
                    "metrics": {k: v for k, v in self.metrics.get(key, {}).items() if math.isfinite(v)},
                }
            )
        meta: dict[str, Any] = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "student": self.settings.student,
            "rule": self.rule.__dict__,
            "optim": {**self.optim.__dict__, "logvar_init": list(self.optim.logvar_init)},
            "total_updates": self.total_updates,
            "flush_counts": dict(self.flush_counts),
            "skipped": dict(self.skipped),
            "known_layers": list(self.selector.known),
            "current": sorted(self.selector.current),
            "layers": layers_meta,
            "replay": self.replay.meta(),
            "last_sigma": self._last_sigma,
            "run_structured": self._run_structured,
        }
        if self.settings.save_replay:
            rt, records = self.replay.export()
            tensors.update(rt)
            meta["replay"]["records"] = records
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore `state()`. Settings from the config win over the file's; differences are logged."""
        self.prepare_state(tensors, meta).commit()

    def prepare_state(
        self,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        held: Mapping[str, Collection[str] | None] | None = None,
    ) -> StagedState:
        """Validate `state()` output (`distill_state.parse_state`) without changing anything; the stage applies it.

        `held`: learned backend → the layers the same file holds weights for (`Session.load`; None for a backend
        that cannot tell); `held` None: the student's live layers. A layer this state says was trained must be
        among them."""
        layers = held.get(self.settings.student, ()) if held is not None else self.student.layers
        snap = parse_state(
            tensors,
            meta,
            student=self.settings.student,
            file_layers=None if layers is None else set(layers),
            current_settings={
                "readiness": self.rule.__dict__,
                "optimizer": {**self.optim.__dict__, "logvar_init": list(self.optim.logvar_init)},
            },
            replay_like=self.replay,
            storage_dtype=self.storage_dtype,
        )
        return StagedState(lambda: self._commit_state(snap))

    def _commit_state(self, snap: DistillerSnapshot) -> None:
        with torch.inference_mode(False):
            self.rng.set_state(snap.rng_state)
        self.total_updates = snap.total_updates
        self.flush_counts = Counter(snap.flush_counts)
        self.skipped = Counter(snap.skipped)
        self.selector.known, self.selector._known_set = [], set()
        self.selector.add_known(snap.known_layers)
        self.selector.current = {k for k in snap.current if self.selector.eligible(k)}
        self._last_sigma = snap.last_sigma
        self._run_structured = snap.run_structured
        for entry in snap.layers:
            key = entry.key
            entry.readiness.set_from_ema(self.rule)
            self.readiness[key] = entry.readiness
            cap = entry.query_cap if entry.query_cap is not None else self.settings.query_cap
            self.query_caps[key] = min(cap, self.settings.query_cap)
            self.oom_events[key] = entry.oom_events
            self.shrinks[key] = entry.shrinks
            if entry.disabled:
                self.selector.disabled.add(key)
            self.metrics[key] = entry.metrics
            self.trainers.pop(key, None)
            if entry.optimizer:
                self._pending_opt[key] = entry.optimizer
        if snap.replay is not None:
            self.replay = snap.replay
        else:
            self.replay.counters = snap.counters
        self._mirror_readiness()


def resolve_settings(settings: Any, session: Session, section: str = "distill") -> DistillSettings:
    """The distiller's settings: the factory's argument when it is a `DistillSettings`, else the config
    section `[plugins.<section>]`, else a `<section>` field of the plugin's own section, else defaults."""
    if isinstance(settings, DistillSettings):
        return settings
    found = session.config.sections.get(section)
    if isinstance(found, DistillSettings):
        return found
    nested = getattr(settings, section, None)
    if isinstance(nested, DistillSettings):
        return nested
    return DistillSettings()


def register_distiller(registrar: Registrar, name: str = "ttr", section: str = "distill") -> None:
    """Register the online distiller as `name`; its settings come from `[plugins.<section>]`.

    Call from a plugin's `attnplug_register_distillers(registrar)` hook; the plugin also returns
    `{section: DistillSettings}` from `attnplug_config_sections` (see `resolve_settings`).
    """

    def factory(settings: Any, session: Session) -> OnlineDistiller:
        return OnlineDistiller(resolve_settings(settings, session, section), session, name=name)

    registrar.add(
        name,
        factory,
        DistillSettings,
        doc="online distillation from exact attention while sampling (replay, Kendall loss, EMA readiness)",
    )
