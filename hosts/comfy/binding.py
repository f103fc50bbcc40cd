"""Bind an attnplug session to a ComfyUI `ModelPatcher`.

`bind(model, spec)` clones the patcher and installs, all under the key `attnplug`:
- `transformer_options["optimized_attention_override"]`: every `@wrap_attn` kernel call goes through
  `AttnplugBinding.override`. Another pack's override is attnplug's exact path in either order: one set
  before attnplug is kept and called (chaining); one set after attnplug (which replaces attnplug's in
  the model's options) is found at the start of each sampling run, when attnplug puts its own back on
  top for that run and calls the other one as its exact path. Either way the log says which override
  was wrapped. A pack that chains to the override it replaced calls back into attnplug, which then
  passes the call down (to the override attnplug wrapped at bind, or ComfyUI's kernel): no recursion.
  An earlier attnplug binding on the same model is replaced, not stacked.
- an `attn1_patch` (captures the txt/img split of double blocks), a `DIFFUSION_MODEL` wrapper
  (context length and latent grid) and an `OUTER_SAMPLE` wrapper (the guider's cfg, the override
  check above, and a failed checkpoint save raised as the sampler node's error once sampling is done);
- `ON_PRE_RUN` / `ON_CLEANUP` callbacks: pre-run (re)builds the session from its spec — also when
  the node output was cached and its session was cleaned up — and starts a run; cleanup ends the
  run, saves the checkpoint when training (only when something was trained), and drops the session
  so GPU tensors are released and repeated runs do not grow memory. A session whose save failed is
  kept, with its training, for the next run's save.
- a layer whose shape differs from the checkpoint's is an error at its first call (for models whose
  blocks do not tell their shapes to the nodes' check before sampling); that checkpoint is not saved.

ComfyUI is imported lazily (inside functions), so this module imports without ComfyUI.
"""
from __future__ import annotations

import copy
import logging
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ...core import Session
from ...core.checkpoint import CheckpointError
from .calls import CallBuilder, CallState, Capture
from .layout import as_bhnd_output, from_bhnd, to_bhnd
from .plans import model_fingerprints

log = logging.getLogger("attnplug")

KEY = "attnplug"
OVERRIDE = "optimized_attention_override"
NO_BLOCK_INFO_WARNING = (
    "attnplug: this ComfyUI build puts no block_type/block_index into transformer_options (ComfyUI adds "
    "them from 2025-11-26 on). attnplug cannot tell layers apart, so every attention call runs the "
    "exact path (the previous override or ComfyUI's kernel); nothing is trained or approximated. "
    "Update ComfyUI to use attnplug's learned attention.")


class CheckpointSaveError(RuntimeError):
    """A training run's checkpoint could not be written; the message names the file and the reason."""


@dataclass
class SessionSpec:
    """Everything needed to (re)build a session: config data plus host-side options.

    `config` is a plain attnplug config dict (validated when the session is built); its `checkpoint`
    is the file the session loads at start and, when `training`, saves at cleanup. `plan`, when set,
    gives the config of each new session instead (`plan.config()`, e.g. the Apply node's `ApplyPlan`,
    which re-reads its checkpoint when the file changed).
    """

    config: dict[str, Any]
    report_steps: bool = False
    memory_reserve: bool = False
    label: str = "attnplug"
    plan: Any = None
    keep_session: bool = False  # keep one session across sampling runs (calibration steers it between runs)

    def current_config(self) -> dict[str, Any]:
        """The config a session built now gets."""
        return self.plan.config() if self.plan is not None else copy.deepcopy(self.config)

    @property
    def training(self) -> bool:
        return bool(self.config.get("training", False))

    @property
    def checkpoint(self) -> str | None:
        return self.config.get("checkpoint")


class SessionHandle:
    """Owns the live session of one binding; builds it on demand and drops it at cleanup."""

    def __init__(self, spec: SessionSpec) -> None:
        self.spec = spec
        self.session: Session | None = None
        self.builds = 0
        self.saves = 0
        self.save_error: CheckpointSaveError | None = None  # the last run's failed save, for the binding to raise
        self.refused: str | None = None  # why this session's checkpoint must not be saved

    def ensure(self) -> Session:
        """The live session, built from the spec (and its checkpoint, when the file exists) if needed."""
        if self.session is None or self.session.closed:
            self.session = Session(self.spec.current_config())
            self.refused = None
            self.builds += 1
            if self.builds > 1:
                ckpt = self.spec.checkpoint
                log.info("attnplug: %s: session rebuilt%s", self.spec.label,
                         f" from checkpoint {ckpt}" if ckpt and Path(ckpt).is_file() else "")
        return self.session

    def finish(self) -> Path | None:
        """End the run; when training, save the checkpoint if this session trained anything, then release
        the session. A failed save keeps the session (its training is saved at the end of the next run) and
        is recorded in `save_error`. Never raises (cleanup runs in `finally`)."""
        session = self.session
        if session is None:
            return None
        self.save_error = None
        label, ckpt = self.spec.label, self.spec.checkpoint
        try:
            session.run_end()
        except Exception as exc:  # noqa: BLE001 - cleanup must not mask the sampling result
            log.error("attnplug: %s: ending the run failed: %s: %s", label, type(exc).__name__, exc)
        if self.spec.keep_session and not self.spec.training:
            return None
        if not (self.spec.training and ckpt):
            return self._release()
        if self.refused:
            log.warning("attnplug: %s: checkpoint %s is not saved: %s", label, ckpt, self.refused)
            return self._release()
        if not sum(s.trained for s in session.stats.values()):
            log.info("attnplug: %s: no attention call was trained in this run; checkpoint %s is left as it was",
                     label, ckpt)
            return self._release()
        try:
            saved = session.save(ckpt)
        except Exception as exc:  # noqa: BLE001 - reported to the sampler node by the binding
            self.save_error = CheckpointSaveError(
                f"attnplug {label}: could not save checkpoint {ckpt}: {type(exc).__name__}: {exc}. This run's "
                "training is kept in memory and saved when the next sampling run through this model ends (free "
                "disk space or fix the folder's permissions, then queue again).")
            log.error("%s", self.save_error)
            return None
        self.saves += 1
        log.info("attnplug: %s: checkpoint saved to %s", label, saved)
        self._release()
        return saved

    def release(self) -> None:
        """Close the session now (a kept session is released by its owner when done)."""
        self._release()

    def _release(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()


@dataclass
class StepReport:
    """Counters behind the one-line console summary per sampler step."""

    started: bool = False
    step: int | None = None
    num_steps: int | None = None
    sigma: float | None = None
    calls0: int = 0
    approx0: int = 0
    trained0: int = 0
    lines: list[str] = field(default_factory=list)


class AttnplugBinding:
    """The override, patch, wrappers and callbacks of one bound model."""

    def __init__(self, spec: SessionSpec, prior: Callable[..., Any] | None) -> None:
        self.handle = SessionHandle(spec)
        self.prior = prior
        self.state = CallState()
        self.calls = CallBuilder(self.state)
        self.report = StepReport()
        self.reserved = 0
        self.exact_calls = 0  # calls served on the exact path without the session (unidentified)
        self.run_prior: Callable[..., Any] | None = None  # an override set after attnplug, wrapped for this run
        self._checked: set[str] = set()  # layers whose shape was compared with the checkpoint's
        self._warned: set[str] = set()
        self._bound: weakref.ref[Session] | None = None  # the session that has the model's fingerprints (weak:
        # cleanup must release it)

    # ---- exact path ---------------------------------------------------------------------------
    def _exact(self, func: Callable[..., Any], q: Any, k: Any, v: Any, heads: int, kwargs: dict[str, Any]) -> Any:
        """The other pack's override (set after attnplug, else before it), else ComfyUI's kernel;
        `_inside_attn_wrapper` stays in kwargs (ComfyUI's wrapper does not call the override again)."""
        if self.run_prior is not None:
            return self.run_prior(func, q, k, v, heads, **kwargs)
        return self._below(func, q, k, v, heads, kwargs)

    def _below(self, func: Callable[..., Any], q: Any, k: Any, v: Any, heads: int, kwargs: dict[str, Any]) -> Any:
        """What sits under attnplug: the override set before it, else ComfyUI's kernel."""
        if self.prior is not None:
            return self.prior(func, q, k, v, heads, **kwargs)
        return func(q, k, v, heads, **kwargs)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ---- the override -------------------------------------------------------------------------
    def override(self, func: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 **kwargs: Any) -> torch.Tensor:
        """`optimized_attention_override(func, q, k, v, heads, **kwargs)` as ComfyUI's `wrap_attn` calls it."""
        st = self.state
        if st.inside:  # an override attnplug called (its exact path) chained back to attnplug's: pass it down
            return self._below(func, q, k, v, heads, kwargs)
        st.inside = True
        try:
            return self._serve(func, q, k, v, heads, kwargs)
        finally:
            st.inside = False

    __call__ = override

    def _serve(self, func: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               kwargs: dict[str, Any]) -> torch.Tensor:
        to = kwargs.get("transformer_options") or {}
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        n = q.shape[2] if skip_reshape else q.shape[1]
        call = self.calls.build(to, int(n))
        if call == "no-block":
            self._warn("no-block", NO_BLOCK_INFO_WARNING)
            self.exact_calls += 1
            return self._exact(func, q, k, v, heads, kwargs)
        if call is None or isinstance(call, str):
            self._warn(f"split:{to.get('block_type')}:{to.get('block_index')}",
                       f"attnplug: {to.get('block_type')}:{to.get('block_index')}: the host did not tell the "
                       "text/image split of this call (no img_slice, no captured context); exact attention.")
            self.exact_calls += 1
            return self._exact(func, q, k, v, heads, kwargs)
        session = self.handle.ensure()
        if session.run is None:
            session.run_start(num_steps=call.num_steps, host="comfy")
        qb, kb, vb = (to_bhnd(t, heads, skip_reshape) for t in (q, k, v))
        if call.layer_key not in self._checked:
            self._check_fit(session, call.layer_key, qb)
        mask = kwargs.get("mask")

        def host_attention(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor,
                           mask_: torch.Tensor | None) -> torch.Tensor:
            kw = dict(kwargs)
            kw.update(skip_reshape=True, skip_output_reshape=True, mask=mask_)
            return as_bhnd_output(self._exact(func, q_, k_, v_, heads, kw), heads)

        if not self.report.started or call.step_index != self.report.step:
            self._on_step(session, call)
        if self.handle.spec.memory_reserve:
            self._reserve(session, qb, kb, vb, call)
        out = session.attention(qb, kb, vb, call, mask, host_attention)
        return from_bhnd(out, bool(kwargs.get("skip_output_reshape", False)))

    def _check_fit(self, session: Session, layer_key: str, q: torch.Tensor) -> None:
        """At a layer's first call: refuse a checkpoint whose layer has another shape (never train or save it)."""
        self._checked.add(layer_key)
        got = (int(q.shape[1]), int(q.shape[3]))
        for backend in session.learned_backends().values():
            spec = backend.specs.get(layer_key)
            if spec is not None and (spec.heads, spec.head_dim) != got:
                reason = (f"it was trained on another model: layer {layer_key} has {spec.heads} heads × "
                          f"{spec.head_dim} in the file, this model sends {got[0]} × {got[1]}")
                self.handle.refused = reason
                raise CheckpointError(f"attnplug {self.handle.spec.label}: checkpoint {self.handle.spec.checkpoint} "
                                      f"does not fit this model and is left untouched: {reason}. Choose this model's "
                                      "checkpoint, or a new file name to train one.")

    # ---- memory ---------------------------------------------------------------------------------
    def _reserve(self, session: Session, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Any) -> None:
        """Ask ComfyUI to free `1.1 ×` the backend's estimate, once per new maximum (off by default)."""
        try:
            need = int(session.primary.memory_estimate(q, k, v, call, training=session.training) * 1.1)
        except Exception as exc:  # noqa: BLE001
            self._warn("estimate", f"attnplug: memory estimate failed ({exc}); no reservation")
            return
        if need <= self.reserved:
            return
        import comfy.model_management as mm

        mm.free_memory(need, q.device)
        self.reserved = need

    # ---- steps: console summary -----------------------------------------------------------------
    def _on_step(self, session: Session, call: Any) -> None:
        rep = self.report
        if rep.started and self.handle.spec.report_steps:
            self._summarize(session)
        rep.started = True
        rep.step, rep.num_steps, rep.sigma = call.step_index, call.num_steps, call.sigma
        run = session.run
        rep.calls0 = run.calls if run else 0
        rep.approx0 = run.approximate_calls if run else 0
        rep.trained0 = sum(s.trained for s in session.stats.values())
        # no ProgressBar of our own: ComfyUI's sampler nodes already send one progress message per step
        # (latent_preview's callback); a second bar on the same node doubled every message in the UI

    def _summarize(self, session: Session) -> None:
        rep = self.report
        run = session.run
        calls = (run.calls if run else 0) - rep.calls0
        approx = (run.approximate_calls if run else 0) - rep.approx0
        trained = sum(s.trained for s in session.stats.values()) - rep.trained0
        ready = session.summary()["ready"]
        n_ready = sum(len(v) for v in ready.values())
        n_layers = len(session.stats)
        step = "?" if rep.step is None else rep.step + 1
        total = rep.num_steps if rep.num_steps is not None else "?"
        sigma = "?" if rep.sigma is None else f"{rep.sigma:.4g}"
        line = (f"attnplug {self.handle.spec.label} step {step}/{total} sigma={sigma}: {calls} attention calls, "
                f"{approx} approximate, {trained} trained; ready layers {n_ready}/{n_layers}")
        rep.lines.append(line)
        log.info(line)

    # ---- callbacks, patch, wrappers ----------------------------------------------------------
    def on_pre_run(self, patcher: Any) -> None:
        self._checked.clear()
        session = self.handle.ensure()
        if self._bound is None or self._bound() is not session:  # which model this is, once per session
            self._bound = weakref.ref(session)
            try:
                session.bind_model(model_fingerprints(patcher))
            except Exception as exc:  # noqa: BLE001 - telling models apart must never stop sampling
                log.warning("attnplug: %s: the model's fingerprints could not be read (%s: %s); a checkpoint of "
                            "another model is not detected", self.handle.spec.label, type(exc).__name__, exc)
        session.run_start(host="comfy")  # ends a run left open, e.g. by calls outside a sampler
        self.state.clear()
        self.report = StepReport()
        self.reserved = 0

    def on_cleanup(self, patcher: Any) -> None:
        if self.handle.session is not None and self.report.started and self.handle.spec.report_steps:
            self._summarize(self.handle.session)
        self.handle.finish()
        self.state.clear()
        self.reserved = 0

    def attn1_patch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: Any = None, attn_mask: Any = None,
                    extra_options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Capture the host's txt/img split (`extra_options["img_slice"]`) for the attention call that follows."""
        eo = extra_options or {}
        sl = eo.get("img_slice")
        if sl is not None and len(sl) == 2:
            self.state.capture = Capture((eo.get("block_type"), eo.get("block_index")), int(sl[0]), int(sl[1]))
        else:
            self.state.capture = None
        return {}

    def diffusion_model_wrapper(self, executor: Any, x: Any, timestep: Any, context: Any, *args: Any,
                                **kwargs: Any) -> Any:
        """Record the text length (`context.shape[1]`) and latent token grid of this forward."""
        st = self.state
        st.context_len = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.dim() == 3 else None
        patch = getattr(getattr(executor, "class_obj", None), "patch_size", None)
        if isinstance(x, torch.Tensor) and x.dim() == 4 and isinstance(patch, int) and patch > 0:
            st.latent_grid = (math.ceil(x.shape[-2] / patch), math.ceil(x.shape[-1] / patch))
        else:
            st.latent_grid = None
        if self.handle.session is not None:
            self._offer_text(self.handle.session, context, args, kwargs)
        return executor(x, timestep, context, *args, **kwargs)

    @staticmethod
    def _offer_text(session: Session, context: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The prompt's pooled embedding for a routing policy: Flux's `y` (CLIP pooled), else the context tokens —
        of the conditional rows when `cond_or_uncond` tells them. A reference only: nothing is copied here."""
        from ...core.conditioning import cond_rows

        y = kwargs.get("y", args[0] if args else None)
        text = y if isinstance(y, torch.Tensor) and y.dim() == 2 else context
        if not isinstance(text, torch.Tensor):
            return
        to = kwargs.get("transformer_options") or next((a for a in args if isinstance(a, dict)), {})
        cu = to.get("cond_or_uncond") if isinstance(to, dict) else None
        session.offer_text(cond_rows(text, list(cu) if cu else None))

    def outer_sample_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """One sampling run: record the guider's cfg, put attnplug's override back on top of one set after it,
        and raise a failed checkpoint save as this sampler node's error once sampling has finished."""
        guider = getattr(executor, "class_obj", None)
        cfg = getattr(guider, "cfg", None)
        self.calls.cfg = float(cfg) if isinstance(cfg, (int, float)) else None
        self._take_the_top(getattr(guider, "model_options", None))
        try:
            out = executor(*args, **kwargs)
        finally:
            error, self.handle.save_error = self.handle.save_error, None
            self.run_prior = None
        if error is not None:
            raise error
        return out

    def _take_the_top(self, model_options: Any) -> None:
        """The run's `transformer_options` (the guider's copy for this run): when another node set its
        attention override after attnplug, attnplug's goes back on top and the other one is its exact path."""
        to = model_options.get("transformer_options") if isinstance(model_options, dict) else None
        if not isinstance(to, dict):
            return
        current = to.get(OVERRIDE)
        if getattr(current, "__self__", None) is self:
            return
        to[OVERRIDE] = self.override
        self.run_prior = current
        name = "(removed)" if current is None else _name(current)
        self._warn(f"top:{name}", f"attnplug: {self.handle.spec.label}: another node set the attention override "
                   f"{name} after attnplug; attnplug wraps it and uses it as its exact path (host attention)"
                   if current is not None else f"attnplug: {self.handle.spec.label}: another node removed attnplug's "
                   "attention override; attnplug puts it back for each sampling run")


def _name(fn: Any) -> str:
    """A readable name of an override for the log."""
    owner = getattr(fn, "__self__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(owner if owner is not None else fn).__module__
    return f"{module}.{qual}" if module else qual


def current_binding(model: Any) -> AttnplugBinding | None:
    """The attnplug binding installed on a ModelPatcher, if any (also when another node's attention
    override has replaced attnplug's in the model's options: its callbacks still say)."""
    to = model.model_options.get("transformer_options", {})
    owner = getattr(to.get(OVERRIDE), "__self__", None)
    if isinstance(owner, AttnplugBinding):
        return owner
    from comfy.patcher_extension import CallbacksMP

    for callback in model.get_callbacks(CallbacksMP.ON_PRE_RUN, KEY):
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, AttnplugBinding):
            return owner
    return None


def bind(model: Any, spec: SessionSpec) -> Any:
    """Clone `model` (a ComfyUI ModelPatcher) and bind a session built from `spec` to the clone.

    Returns the clone; the source patcher is untouched. A foreign override already present is kept
    as the exact path; an earlier attnplug binding is replaced (the overrides it wrapped are kept).
    """
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    current = to.get(OVERRIDE)
    prior = current
    old = current_binding(m)
    if old is not None:
        log.info("attnplug: %s replaces the attnplug binding already on this model (%s)", spec.label,
                 old.handle.spec.label)
        prior = old.prior
        if current is not None and getattr(current, "__self__", None) is not old:
            prior = current
            log.info("attnplug: %s wraps the attention override %s another node set after the earlier attnplug "
                     "binding, as its exact path", spec.label, _name(current))
        for kind in (CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP):
            m.remove_callbacks_with_key(kind, KEY)
        for kind in (WrappersMP.DIFFUSION_MODEL, WrappersMP.OUTER_SAMPLE):
            m.remove_wrappers_with_key(kind, KEY)
        patches = to.get("patches", {})
        if "attn1_patch" in patches:
            patches["attn1_patch"] = [p for p in patches["attn1_patch"]
                                      if not isinstance(getattr(p, "__self__", None), AttnplugBinding)]
    elif prior is not None:
        log.info("attnplug: %s wraps the attention override %s another node set before it, as its exact path",
                 spec.label, _name(prior))
    binding = AttnplugBinding(spec, prior)
    to[OVERRIDE] = binding.override
    m.set_model_attn1_patch(binding.attn1_patch)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, binding.diffusion_model_wrapper)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, binding.outer_sample_wrapper)
    m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, KEY, binding.on_pre_run)
    m.add_callback_with_key(CallbacksMP.ON_CLEANUP, KEY, binding.on_cleanup)
    return m
