"""`Session`: the one object a host talks to — `attention(...)` per call, plus the run lifecycle.

Data flow of one call (docs/ARCHITECTURE.md has the picture):
host → `Session.attention(q, k, v, call, mask, host_attention)` → step/run tracking →
`Router.route` (cached per step and layer: gates, readiness) → distiller (teacher + observe) or
approximate backend (capability check, run, finite check, fallback) or exact backend → `[B, H, N, D]`.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from .backend import Backend, BackendRegistry, HostAttention, LearnedBackend, StagedState, checked_output
from .call import AttentionCall
from .checkpoint import CheckpointError, checkpoint_path_problem, load_checkpoint, save_checkpoint
from .config import Config, check_semantics, load_config
from .exact import HostBackend
from . import model_identity
from .finite import FiniteFlags
from .gates import Route, Router
from .shard import all_reduce_max
from .loggers import LoggerFanout
from .plugins import Plugins, get_plugins

if TYPE_CHECKING:
    from .distiller import Distiller

log = logging.getLogger("attnplug")

#: finite_check = "per_step": approximate calls between two polls of the non-finite flags when no step starts
POLL_CALLS = 64


class ApproximationError(RuntimeError):
    """Raised in strict mode where the session would otherwise fall back to exact attention."""


@dataclass
class LayerStats:
    """Per-layer counters: calls, which backend served them, and every fallback with its reason."""

    calls: int = 0
    served: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    trained: int = 0
    shadow_calls: int = 0
    shadow_cosine_sum: float = 0.0
    shadow_rel_l2_sum: float = 0.0

    def record_shadow(self, out: torch.Tensor, exact: torch.Tensor) -> None:
        """Fidelity of an approximate output against the exact one: mean per-token/head cosine, relative L2."""
        o, e = out.float(), exact.float()
        self.shadow_cosine_sum += float(torch.nn.functional.cosine_similarity(o, e, dim=-1).mean())
        self.shadow_rel_l2_sum += float((o - e).norm() / e.norm().clamp_min(1e-12))
        self.shadow_calls += 1

    def counts(self) -> Counter:
        """Flat counters `calls`, `served/<backend>`, `fallback/<reason>`: their differences are a run's stats."""
        flat = Counter({"calls": self.calls})
        flat.update({f"served/{b}": n for b, n in self.served.items()})
        flat.update({f"fallback/{r}": n for r, n in self.fallbacks.items()})
        return flat

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"calls": self.calls, "served": dict(self.served), "fallbacks": dict(self.fallbacks),
                                "trained": self.trained}
        if self.shadow_calls:
            data["fidelity"] = {"calls": self.shadow_calls, "cosine": self.shadow_cosine_sum / self.shadow_calls,
                                "rel_l2": self.shadow_rel_l2_sum / self.shadow_calls}
        return data


@dataclass
class RunInfo:
    """One sampling run: index within the session, step count when known, timing and host metadata."""

    index: int
    num_steps: int | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    host: dict[str, Any] = field(default_factory=dict)
    calls: int = 0
    approximate_calls: int = 0
    #: the σ of each step, in order (None where the host gave none)
    sigmas: list[float | None] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "num_steps": self.num_steps, "started": self.started, "ended": self.ended,
                "calls": self.calls, "approximate_calls": self.approximate_calls, **self.host}


class Session:
    """Built from a config; routes every attention call; owns backends, gates, distiller and loggers."""

    def __init__(self, config: "Config | str | Path | Mapping[str, Any]", plugins: Plugins | None = None) -> None:
        self.plugins = plugins or get_plugins()
        self.config = load_config(config, self.plugins)
        root = self.config.root
        self.active_plugins = self.plugins.active(root.disable_plugins)
        self.strict = root.strict
        self.training = root.training
        self.generator = torch.Generator().manual_seed(root.seed)
        self.stats: dict[str, LayerStats] = {}
        self.run: RunInfo | None = None
        self.last_run: RunInfo | None = None
        self.runs_done = 0
        #: checkpoint components of other kinds than backend/distiller (e.g. a serving plan), kept from the
        #: loaded checkpoint and written back by `save`; plugins read their own by name
        self.components: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        self.checkpoint_path: Path | None = None
        #: the bound model's per-layer weight fingerprints (`bind_model`, core/model_identity.py)
        self.model_fingerprints: dict[str, torch.Tensor] = {}
        self._text: torch.Tensor | None = None  # the host's latest pooled conditioning embedding (core.conditioning)
        self._step_key: tuple[Any, ...] | None = None
        self._last_step: int | None = None
        self._last_sigma: float | None = None
        self._warned: set[tuple[str, str]] = set()
        # finite_check = "per_step": a device flag per layer that the backend raises where it replaced non-finite
        # rows, polled without waiting for the GPU once per step (and every POLL_CALLS approximate calls), and
        # the layers found non-finite: served exact for the rest of the session
        self._finite = FiniteFlags()
        self._finite_backend: dict[str, str] = {}  # layer -> the backend whose output raised its flag
        self._calls_since_poll = 0
        self._sharded_since_poll = False  # a sequence-parallel call was served: the next poll waits (same on every rank)
        self._nonfinite_layers: set[str] = set()
        self._reasons_cache: dict[tuple[Any, ...], list[str]] = {}
        self._run_base: dict[str, Counter] = {}  # LayerStats.counts() at run start (per-run serving stats)
        self.closed = False
        problem = checkpoint_path_problem(root.checkpoint) if root.checkpoint else None
        if problem:  # before anything is built or trained: a save there would fail at the end
            raise CheckpointError(f"config {self.config.source}: checkpoint: {problem}")

        blocked = root.disable_plugins
        self.backends = BackendRegistry()
        for name, reg in self.plugins.collect("backend", blocked).entries.items():
            settings = self.config.sections.get(reg.plugin)
            self.backends.add(reg.factory(settings, self), reg.plugin)
        self.router = Router([], self.backends, root.backend, root.exact)
        gate_regs = self.plugins.collect("gate", blocked)
        self.router.gates = [gate_regs.get(e.kind).factory(e.settings, self) for e in self.config.gates]
        logger_regs = self.plugins.collect("logger", blocked)
        self.loggers = LoggerFanout([logger_regs.get(e.kind).factory(e.settings, self) for e in self.config.loggers])
        self.distiller: Distiller | None = None
        if root.distiller is not None:
            reg = self.plugins.collect("distiller", blocked).get(root.distiller)
            self.distiller = reg.factory(self.config.sections.get(reg.plugin), self)
        self.plugins.session_start(self)
        if root.checkpoint:
            self._load_configured_checkpoint(root.checkpoint)

    def _load_configured_checkpoint(self, path: str) -> None:
        """Load `config.checkpoint`. Missing: a training session starts fresh (and saves there); a serving one
        warns that its learned layers stay exact (`strict`: an error, also raised by config validation)."""
        if Path(path).exists():
            self.load(path)
        elif self.training:
            log.info("attnplug: checkpoint %s does not exist yet: training starts fresh and saves there", path)
        elif self.strict:
            raise CheckpointError(f"checkpoint {path}: no such file (strict mode; the config serves from it)")
        else:
            log.warning("attnplug: checkpoint %s does not exist: serving without it (learned layers stay exact "
                        "until trained)", path)

    # ---- helpers for plugins ----------------------------------------------------------------
    def router_is_exact(self, name: str) -> bool:
        return self.router.is_exact(name)

    @property
    def primary(self) -> Backend:
        """The configured `backend` (approximate or exact)."""
        return self.backends.get(self.config.root.backend)

    def learned_backends(self) -> dict[str, LearnedBackend]:
        return {n: e.backend for n, e in self.backends.items() if isinstance(e.backend, LearnedBackend)}

    def check_layers(self, layer_keys: Sequence[str]) -> list[str]:
        """Warn (once each) about config layer patterns that match none of `layer_keys`, the model's attention
        layers; hosts call this when they know them. Returns the warnings."""
        ctx = check_semantics(self.config, {n: e.backend.capabilities for n, e in self.backends.items()}, layer_keys)
        for message in ctx.pattern_warnings:
            self.warn_once("-", f"config:{message}", f"config {self.config.source}: {message}")
        return ctx.pattern_warnings

    def offer_text(self, embedding: torch.Tensor | None) -> None:
        """The host's pooled conditioning embedding for the forward that follows (`[B, D]` or `[D]`, any device;
        only a reference is kept: no copy, no sync). Gates that decide by the prompt read `text_embedding`."""
        self._text = embedding if isinstance(embedding, torch.Tensor) and embedding.numel() else None

    @property
    def text_embedding(self) -> torch.Tensor | None:
        """The latest embedding a host offered (None when it offered none)."""
        return self._text

    def warn_once(self, layer_key: str, what: str, message: str) -> None:
        """Log `message` once per (layer, kind of event)."""
        if (layer_key, what) not in self._warned:
            self._warned.add((layer_key, what))
            log.warning("attnplug: %s", message)

    # ---- the hot path --------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                  mask: torch.Tensor | None = None, host_attention: HostAttention | None = None) -> torch.Tensor:
        """Attention for one call: `[B, H, N, D]` in, `[B, H, Nq, Dv]` out, routed by gates and readiness."""
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"attnplug Session.attention({call.layer_key}): q, k, v must be [B, H, N, D], "
                             f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        self._track(call)
        stats = self.stats.get(call.layer_key)
        if stats is None:
            stats = self.stats[call.layer_key] = LayerStats()
        stats.calls += 1
        assert self.run is not None
        self.run.calls += 1
        route = self.router.route(call, self.run.index)
        if route.failures:
            self._route_failed(call, route, stats)
        # while training in passthrough mode the sampler always gets exact attention
        serve_approximate = route.approximate and not (self.training and self.config.root.mode == "passthrough") \
            and call.layer_key not in self._nonfinite_layers

        if self.training and self.distiller is not None and call.shard is not None:
            self.warn_once(call.layer_key, "shard-not-distilled", f"{call.layer_key}: sequence-parallel calls are "
                           "not distilled (a rank holds a slice of the keys); distil data-parallel instead "
                           "(plugins/ttr/distill_parallel.py)")
        elif self.training and self.distiller is not None and self._distiller_wants(call):
            teacher = self._exact(q, k, v, call, mask, host_attention, stats)
            self._observe(call, q, k, v, teacher, mask, stats)
            if not serve_approximate:
                return teacher
            return self._approximate(route, q, k, v, call, mask, host_attention, stats, teacher)
        if serve_approximate:
            return self._approximate(route, q, k, v, call, mask, host_attention, stats, None)
        exact = self.config.root.exact if route.approximate else route.backend
        return self._run_exact_named(exact, q, k, v, call, mask, host_attention, stats)

    def _approximate(self, route: Route, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                     mask: torch.Tensor | None, host_attention: HostAttention | None, stats: LayerStats,
                     teacher: torch.Tensor | None) -> torch.Tensor:
        backend = self.backends.get(route.backend)
        reasons = self._reasons(backend, q, k, v, call, mask)
        if reasons:
            return self._fallback(call, route.backend, "unsupported: " + "; ".join(reasons), q, k, v, mask,
                                  host_attention, stats, teacher)
        per_step = self.config.root.finite_check == "per_step"
        try:
            if per_step:  # non-finite rows replaced on the device, the layer's flag raised: no sync
                flag = self._finite.flag(call.layer_key, q.device)
                out = backend.forward_guarded(q, k, v, call, mask, flag)
                if call.shard is not None:  # every rank of the shard sees the flag any of them raised
                    all_reduce_max(flag, call.shard)
                    self._sharded_since_poll = True
            else:
                out = backend(q, k, v, call, mask)
            out = checked_output(out, q, v)
        except torch.cuda.OutOfMemoryError:
            if self.strict:
                raise
            return self._fallback(call, route.backend, "out of memory", q, k, v, mask, host_attention, stats, teacher)
        except Exception as exc:  # noqa: BLE001 - an approximate backend must never abort sampling
            if self.strict:
                raise ApproximationError(f"backend {route.backend!r} failed on {call.layer_key}: {exc}") from exc
            return self._fallback(call, route.backend, f"error: {type(exc).__name__}: {exc}", q, k, v, mask,
                                  host_attention, stats, teacher)
        if per_step:
            self._finite_backend[call.layer_key] = route.backend
            self._calls_since_poll += 1
            if self._calls_since_poll >= POLL_CALLS:  # a host that reports no steps still gets checked
                self._check_pending_finite()
        elif not self._finite_everywhere(out, call):
            return self._fallback(call, route.backend, "non-finite output", q, k, v, mask, host_attention, stats,
                                  teacher)
        stats.served[route.backend] += 1
        assert self.run is not None
        self.run.approximate_calls += 1
        if self.config.root.shadow_exact:
            exact = teacher if teacher is not None else \
                self._run_exact_named(self.config.root.exact, q, k, v, call, mask, host_attention, None)
            stats.record_shadow(out, exact)
        return out

    def _fallback(self, call: AttentionCall, backend: str, reason: str, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, mask: torch.Tensor | None, host_attention: HostAttention | None,
                  stats: LayerStats, teacher: torch.Tensor | None) -> torch.Tensor:
        if self.strict:
            raise ApproximationError(f"backend {backend!r} could not serve {call.layer_key}: {reason} (strict mode)")
        stats.fallbacks[reason.split(":")[0] if reason.startswith(("unsupported", "error")) else reason] += 1
        self.warn_once(call.layer_key, f"fallback:{reason[:40]}",
                       f"backend {backend!r} fell back to exact attention on {call.layer_key}: {reason}")
        if teacher is not None:
            return teacher
        return self._exact(q, k, v, call, mask, host_attention, stats)

    def _reasons(self, backend: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                 mask: torch.Tensor | None) -> list[str]:
        key = (backend.name, call.layer_key, tuple(q.shape), tuple(k.shape), q.dtype, q.device,
               None if mask is None else (tuple(mask.shape), mask.dtype), call.n_cond_tokens)
        if call.shard is not None:
            if not backend.capabilities.sequence_parallel:
                return [f"{call.layer_key}'s call is one rank's slice of the sequence and backend {backend.name!r} "
                        "does not serve sequence-parallel calls"]
            key += (call.shard,)
        reasons = self._reasons_cache.get(key)
        if reasons is None:
            try:
                reasons = list(backend.not_supported_reasons(q, k, v, call, mask))
            except Exception as exc:  # noqa: BLE001 - a capability check that raises cannot vouch for the call
                reasons = [f"capability check raised {type(exc).__name__}: {exc}"]
            self._reasons_cache[key] = reasons
        return reasons

    def _route_failed(self, call: AttentionCall, route: Route, stats: LayerStats) -> None:
        """A gate or readiness check raised (the router vetoed): counted, warned once per layer, strict raises."""
        for kind, message in route.failures:
            if self.strict:
                raise ApproximationError(f"{message} (strict mode)")
            stats.fallbacks[kind] += 1
            self.warn_once(call.layer_key, f"{kind}:{message[:60]}", f"{message}; exact attention instead")

    def _exact(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
               mask: torch.Tensor | None, host_attention: HostAttention | None, stats: LayerStats) -> torch.Tensor:
        return self._run_exact_named(self.config.root.exact, q, k, v, call, mask, host_attention, stats)

    def _run_exact_named(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                         mask: torch.Tensor | None, host_attention: HostAttention | None,
                         stats: LayerStats | None) -> torch.Tensor:
        """Run the exact backend `name`; counts it in `stats` unless that is None (shadow computations)."""
        backend = self.backends.get(name)
        if call.shard is not None and not isinstance(backend, HostBackend):
            # a shard's exact attention needs every rank's keys: only the host's own (distributed) kernel has them
            if host_attention is None:
                raise ValueError(f"attnplug {call.layer_key}: a sequence-parallel call needs the host's attention "
                                 f"for its exact path (exact backend {name!r} sees only this rank's keys)")
            name, backend = "host", self.backends.get("host")
        if isinstance(backend, HostBackend) and host_attention is None:
            self.warn_once(call.layer_key, "no-host", f"{call.layer_key}: exact backend 'host' got no host "
                           "attention function; using 'sdpa'")
            name, backend = "sdpa", self.backends.get("sdpa")
        if stats is not None:
            stats.served[name] += 1
        if isinstance(backend, HostBackend):
            return backend.forward(q, k, v, call, mask, host_attention=host_attention)
        return backend(q, k, v, call, mask)

    def _distiller_wants(self, call: AttentionCall) -> bool:
        assert self.distiller is not None
        try:
            return bool(self.distiller.wants(call))
        except Exception as exc:  # noqa: BLE001
            self.warn_once(call.layer_key, "distiller-wants", f"distiller failed to choose layers: {exc}")
            return False

    def _observe(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 teacher: torch.Tensor, mask: torch.Tensor | None, stats: LayerStats) -> None:
        assert self.distiller is not None
        try:
            self.distiller.observe(call, q, k, v, teacher, mask)
            stats.trained += 1
        except Exception as exc:  # noqa: BLE001 - training problems never abort sampling
            if self.strict:
                raise
            stats.fallbacks["distiller error"] += 1
            self.warn_once(call.layer_key, "distiller", f"distiller failed on {call.layer_key}: "
                           f"{type(exc).__name__}: {exc} (sampling goes on)")

    # ---- steps and runs --------------------------------------------------------------------------
    def _track(self, call: AttentionCall) -> None:
        """Detect new runs and steps from the calls themselves (hosts may also report them)."""
        new_run = self.run is None
        if not new_run and call.step_index is not None and self._last_step is not None \
                and call.step_index < self._last_step:
            new_run = True
        if not new_run and call.step_index is None and call.sigma is not None and self._last_sigma is not None \
                and call.sigma > 1.5 * self._last_sigma + 1e-6:
            new_run = True
        if new_run:
            if self.run is not None:
                self.run_end()
            self.run_start(num_steps=call.num_steps)
        key = (call.step_index, call.sigma)
        if key != self._step_key:
            self._check_pending_finite()
            self._step_key = key
            self._last_step = call.step_index if call.step_index is not None else self._last_step
            self._last_sigma = call.sigma if call.sigma is not None else self._last_sigma
            self.step(call.step_index if call.step_index is not None else -1, call.sigma)

    @staticmethod
    def _finite_everywhere(out: torch.Tensor, call: AttentionCall) -> bool:
        """finite_check = "every_call": whether the output is finite — on a sequence-parallel call on every rank of
        the shard (one all-reduce), so that every rank falls back together."""
        bad = (~torch.isfinite(out).all()).to(torch.int32).reshape(1)
        if call.shard is not None:
            all_reduce_max(bad, call.shard)
        return not bool(bad)

    def _check_pending_finite(self, wait: bool = False) -> None:
        """finite_check = "per_step": poll the layers' device flags (without waiting for the GPU; `wait`: every
        flag as of now, one sync); a layer whose output had non-finite rows — replaced on the device, so they never
        reached the image — is counted, warned once, and served exact for the rest of the session."""
        self._calls_since_poll = 0
        # after sequence-parallel calls the poll waits for the flags: a poll that reads only the flags already on
        # the host could see them at different calls on different ranks, which would then route differently
        wait, self._sharded_since_poll = wait or self._sharded_since_poll, False
        for layer_key in self._finite.poll(wait):
            backend = self._finite_backend.get(layer_key, self.config.root.backend)
            if self.strict:
                raise ApproximationError(f"backend {backend!r} returned non-finite values on {layer_key} "
                                         "(strict mode, finite_check = 'per_step')")
            self.stats.setdefault(layer_key, LayerStats()).fallbacks["non-finite output (replaced on the device)"] += 1
            self._nonfinite_layers.add(layer_key)
            self.warn_once(layer_key, "fallback:non-finite per step",
                           f"backend {backend!r} returned non-finite values on {layer_key}; those rows were replaced "
                           "on the device (finite_check = 'per_step'), and the layer is served exact for the rest "
                           "of the session")

    def run_start(self, num_steps: int | None = None, **host_info: Any) -> RunInfo:
        """A sampling run starts (hosts call this; the session also detects runs by itself)."""
        if self.run is not None:
            self.run_end()
        self.run = RunInfo(index=self.runs_done, num_steps=num_steps, host=dict(host_info))
        self._step_key = None
        self._last_step = None
        self._last_sigma = None
        self.router.invalidate()
        self._run_base = {k: s.counts() for k, s in self.stats.items()}
        if self.distiller is not None:
            self._safe(self.distiller.run_start, self.run)
        self.plugins.run_start(self, self.run)
        self.loggers.run_event("run_start", self.run.to_json())
        return self.run

    def step(self, step_index: int, sigma: float | None) -> None:
        """A sampler step starts; fired once per step."""
        if self.run is not None:
            self.run.sigmas.append(sigma)
        if self.distiller is not None:
            self._safe(self.distiller.step_start, step_index, sigma)
        self.plugins.step_start(self, step_index, sigma)

    def run_end(self) -> RunInfo | None:
        """The current run ended: distiller flush (once), plugin hooks, a log event. No-op without a run."""
        run = self.run
        if run is None:
            return None
        run.ended = time.time()
        self._check_pending_finite(wait=True)
        if self.distiller is not None:
            self._safe(self.distiller.run_end, run)
        self.plugins.run_end(self, run)
        self.loggers.run_event("run_end", run.to_json())
        self._log_serving(run)
        self.last_run = run
        self.run = None
        self.runs_done += 1
        self.router.invalidate()
        return run

    def _log_serving(self, run: RunInfo) -> None:
        """This run's serving statistics: per layer (scope `session/layer`: calls, served/<backend>,
        fallback/<reason>), then the run's totals (scope `session`), both at step = run index."""
        totals: Counter = Counter()
        for key, stats in sorted(self.stats.items()):
            delta = stats.counts() - self._run_base.get(key, Counter())
            if delta:
                totals.update(delta)
                fallbacks = sum(n for k, n in delta.items() if k.startswith("fallback/"))
                self.loggers.log_metrics({"layer": key, **delta, "fallbacks": fallbacks}, run.index, "session/layer")
        totals.pop("calls", None)
        self.loggers.log_metrics({"calls": run.calls, "approximate_calls": run.approximate_calls,
                                  "approximate_share": run.approximate_calls / max(run.calls, 1),
                                  "fallbacks": sum(n for k, n in totals.items() if k.startswith("fallback/")),
                                  **dict(sorted(totals.items()))}, run.index, "session")

    def _safe(self, fn: Any, *args: Any) -> None:
        """Call a lifecycle method of a plugin object; a failure is warned once per method and ignored."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            if self.strict:
                raise
            name = getattr(fn, "__qualname__", None) or repr(fn)
            self.warn_once("-", f"safe:{name}", f"{name} failed: {type(exc).__name__}: {exc} (ignored; later "
                           "failures of it are not logged again)")

    def bind_model(self, fingerprints: Mapping[str, torch.Tensor]) -> None:
        """The host's model: `{layer_key: model_identity.fingerprint(...)}` of the weights that make each layer's q
        and k, handed when it binds the model. Layers of the loaded checkpoint that were distilled on another model
        (`model_identity.differing`) are then withheld — served exact, warned once — in a serving session; a
        training session distils them on this model and its saves record this one."""
        self.model_fingerprints.update({k: v.detach().float().cpu() for k, v in fingerprints.items()})
        self._check_model()

    def _recorded_fingerprints(self) -> dict[str, torch.Tensor]:
        comp = self.components.get(model_identity.COMPONENT)
        return {} if comp is None else model_identity.from_component(*comp)

    def _check_model(self) -> None:
        """Compare the loaded checkpoint's fingerprints with the bound model's (both known): withhold or warn."""
        if not self.model_fingerprints:
            return
        other = model_identity.differing(self._recorded_fingerprints(), self.model_fingerprints)
        for key in [k for k in self.router.withheld if k not in other]:
            del self.router.withheld[key]
        if other:
            worst = max(other.values())
            layers = ", ".join(sorted(other)[:6]) + (f" and {len(other) - 6} more" if len(other) > 6 else "")
            head = (f"checkpoint {self.checkpoint_path}: {len(other)} layer(s) were distilled on another model (their "
                    f"q/k weights differ from this model's by up to {100 * worst:.0f} %, a fine-tune or another "
                    f"model; storing weights in 8 bits moves them ~3 %): {layers}")
            if self.training:
                log.warning("attnplug: %s; distilling them on this model (their readiness is re-measured here)", head)
            elif self.config.root.other_model == "serve":
                log.warning("attnplug: %s; serving them anyway (other_model = 'serve')", head)
            else:
                log.warning("attnplug: %s; serving them exact: distil on this model, or serve its own checkpoint",
                            head)
                for key, d in other.items():
                    self.router.withheld[key] = (f"distilled on another model (q/k weights {100 * d:.0f} % apart): "
                                                 "not served")
        self.router.invalidate()

    def serving_notes(self) -> list[str]:
        """One line from each gate that describes what it serves (e.g. the serving plan), for hosts to report; and
        the layers withheld (distilled on another model)."""
        notes = []
        if self.router.withheld:
            notes.append(f"{len(self.router.withheld)} layer(s) withheld, distilled on another model: "
                         + ", ".join(sorted(self.router.withheld)))
        for gate in self.router.gates:
            describe = getattr(gate, "describe", None)
            if callable(describe):
                try:
                    notes.append(str(describe()))
                except Exception as exc:  # noqa: BLE001 - a report never breaks serving
                    notes.append(f"{getattr(gate, 'name', gate)}: cannot describe itself ({exc})")
        return notes

    # ---- state -----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Per-layer stats and readiness, JSON-able."""
        learned = self.learned_backends()
        return {"runs": self.runs_done, "layers": {k: s.to_json() for k, s in sorted(self.stats.items())},
                "ready": {n: sorted(k for k, r in b.ready.items() if r) for n, b in learned.items()},
                "loggers_disabled": dict(self.loggers.disabled)}

    def save(self, path: str | Path | None = None) -> Path:
        """Write learned layers and distiller state to a checkpoint (atomic). Defaults to `config.checkpoint`."""
        target = path or self.config.root.checkpoint
        if target is None:
            raise ValueError("Session.save: no path given and the config sets no `checkpoint`")
        components: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        for name, backend in self.learned_backends().items():
            if backend.layers or backend.specs:
                components[f"backend.{name}"] = backend.state()  # type: ignore[attr-defined]
        if self.distiller is not None:
            components[f"distiller.{self.distiller.name}"] = self.distiller.state()
        if self.training and self.model_fingerprints:  # the layers were distilled on the bound model
            components[model_identity.COMPONENT] = model_identity.component(
                {**self._recorded_fingerprints(), **self.model_fingerprints})
        for comp, value in self.components.items():
            components.setdefault(comp, value)
        return save_checkpoint(target, components)

    def load(self, path: str | Path) -> None:
        """Load a checkpoint into the learned backends and distiller; refuses mismatches with the reason.

        Atomic: every component is validated and staged first (`prepare_state`), and only when all of them are
        accepted are they committed — a refused component leaves every live weight and state unchanged."""
        comps = load_checkpoint(path)
        learned = self.learned_backends()
        staged: list[StagedState] = []
        held: dict[str, frozenset[str] | None] = {}  # learned backend → the layers this file holds (None: unknown)
        others: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        for comp in sorted(comps, key=lambda c: not c.startswith("backend.")):  # backends before the distiller
            tensors, meta = comps[comp]
            kind, _, name = comp.partition(".")
            try:
                if kind == "backend":
                    if name not in learned:
                        raise CheckpointError(f"it holds learned backend {name!r}, which this session does not have "
                                              f"(learned backends: {sorted(learned)})")
                    stage = learned[name].prepare_state(tensors, meta)
                    held[name] = stage.layers
                    staged.append(stage)
                elif kind == "distiller":
                    if self.distiller is not None and self.distiller.name == name:
                        prepare = getattr(self.distiller, "prepare_state", None)
                        distiller = self.distiller
                        staged.append(prepare(tensors, meta, held) if callable(prepare) else
                                      StagedState(lambda t=tensors, m=meta: distiller.load_state(t, m)))
                    else:
                        log.info("attnplug: checkpoint %s: distiller %r state not loaded (no such distiller active)",
                                 path, name)
                else:
                    others[comp] = (tensors, meta)  # read by plugins (a serving plan), kept for the next save
            except CheckpointError as exc:
                raise CheckpointError(f"checkpoint {path}, component {comp}: {exc}") from None
            except (ValueError, RuntimeError) as exc:
                raise CheckpointError(f"checkpoint {path}, component {comp}: {exc}") from exc
            except (KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as exc:
                raise CheckpointError(f"checkpoint {path}, component {comp}: malformed metadata "
                                      f"({type(exc).__name__}: {exc})") from exc
        if model_identity.COMPONENT in others:
            try:
                model_identity.from_component(*others[model_identity.COMPONENT])
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {path}: {exc}") from None
        for stage in staged:
            stage.commit()
        self.components.update(others)
        self.checkpoint_path = Path(path)
        self._check_model()
        self.router.invalidate()

    def close(self) -> None:
        """End the run if one is open, release device memory, close loggers. Idempotent."""
        if self.closed:
            return
        self.run_end()
        for entry in self.backends.entries.values():
            try:
                entry.backend.release()
            except Exception as exc:  # noqa: BLE001
                log.warning("attnplug: releasing backend %r failed: %s", entry.backend.name, exc)
        self._text = None
        self.plugins.session_close(self)
        self.loggers.close()
        self.closed = True

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(config: "Config | str | Path | Mapping[str, Any]", plugins: Plugins | None = None) -> Session:
    """Build a `Session` from a config file path, a dict or a validated `Config`."""
    return Session(config, plugins)
