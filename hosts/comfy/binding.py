"""Bind an attnplug session to a ComfyUI `ModelPatcher`.

`bind(model, spec)` clones the patcher and installs, all under the key `attnplug`:
- `transformer_options["optimized_attention_override"]`: every `@wrap_attn` kernel call goes through
  `AttnplugBinding.override`. An override another pack set before is kept and called for the exact
  path (chaining); an earlier attnplug binding on the same model is replaced, not stacked.
- an `attn1_patch` (captures the txt/img split of double blocks), a `DIFFUSION_MODEL` wrapper
  (context length and latent grid) and an `OUTER_SAMPLE` wrapper (the guider's cfg);
- `ON_PRE_RUN` / `ON_CLEANUP` callbacks: pre-run (re)builds the session from its spec — also when
  the node output was cached and its session was cleaned up — and starts a run; cleanup ends the
  run, saves the checkpoint when training, and drops the session so GPU tensors are released and
  repeated runs do not grow memory.

ComfyUI is imported lazily (inside functions), so this module imports without ComfyUI.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ...core import Session
from .calls import CallBuilder, CallState, Capture
from .layout import as_bhnd_output, from_bhnd, to_bhnd

log = logging.getLogger("attnplug")

KEY = "attnplug"
OVERRIDE = "optimized_attention_override"
NO_BLOCK_INFO_WARNING = (
    "attnplug: this ComfyUI build puts no block_type/block_index into transformer_options (added in "
    "ComfyUI 2025-11-26, PR #10841). attnplug cannot tell layers apart, so every attention call runs the "
    "exact path (the previous override or ComfyUI's kernel); nothing is trained or approximated. "
    "Update ComfyUI to use attnplug's learned attention.")


@dataclass
class SessionSpec:
    """Everything needed to (re)build a session: config data plus host-side options.

    `config` is a plain attnplug config dict (validated when the session is built); its `checkpoint`
    is the file the session loads at start and, when `training`, saves at cleanup.
    """

    config: dict[str, Any]
    report_steps: bool = False
    memory_reserve: bool = False
    label: str = "attnplug"

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

    def ensure(self) -> Session:
        """The live session, built from the spec (and its checkpoint, when the file exists) if needed."""
        if self.session is None or self.session.closed:
            self.session = Session(copy.deepcopy(self.spec.config))
            self.builds += 1
            if self.builds > 1:
                ckpt = self.spec.checkpoint
                log.info("attnplug: %s: session rebuilt%s", self.spec.label,
                         f" from checkpoint {ckpt}" if ckpt and Path(ckpt).is_file() else "")
        return self.session

    def finish(self) -> Path | None:
        """End the run, save when training, release the session. Never raises (cleanup runs in `finally`)."""
        session, self.session = self.session, None
        if session is None:
            return None
        saved = None
        try:
            session.run_end()
            if self.spec.training and self.spec.checkpoint:
                saved = session.save(self.spec.checkpoint)
                self.saves += 1
                log.info("attnplug: %s: checkpoint saved to %s", self.spec.label, saved)
        except Exception as exc:  # noqa: BLE001 - cleanup must not mask the sampling result
            log.error("attnplug: %s: saving checkpoint %s failed: %s: %s", self.spec.label, self.spec.checkpoint,
                      type(exc).__name__, exc)
        finally:
            session.close()
        return saved


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
    progress: Any = None
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
        self._warned: set[str] = set()

    # ---- exact path ---------------------------------------------------------------------------
    def _exact(self, func: Callable[..., Any], q: Any, k: Any, v: Any, heads: int, kwargs: dict[str, Any]) -> Any:
        """The previous override, else ComfyUI's kernel; `_inside_attn_wrapper` stays in kwargs (no recursion)."""
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

    __call__ = override

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

    # ---- steps: console summary and progress bar -----------------------------------------------
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
        if self.handle.spec.report_steps and call.step_index is not None and call.num_steps:
            try:
                import comfy.utils

                if rep.progress is None:
                    rep.progress = comfy.utils.ProgressBar(call.num_steps)
                rep.progress.update_absolute(call.step_index, call.num_steps)
            except ImportError:
                pass

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
        session = self.handle.ensure()
        session.run_start(host="comfy")  # ends a run left open, e.g. by calls outside a sampler
        self.state.clear()
        self.report = StepReport()
        self.reserved = 0

    def on_cleanup(self, patcher: Any) -> None:
        if self.handle.session is not None and self.report.started and self.handle.spec.report_steps:
            self._summarize(self.handle.session)
            if self.report.progress is not None and self.report.num_steps:
                self.report.progress.update_absolute(self.report.num_steps, self.report.num_steps)
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
        return executor(x, timestep, context, *args, **kwargs)

    def outer_sample_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """Record the guider's cfg scale for this sampling run."""
        cfg = getattr(getattr(executor, "class_obj", None), "cfg", None)
        self.calls.cfg = float(cfg) if isinstance(cfg, (int, float)) else None
        return executor(*args, **kwargs)


def current_binding(model: Any) -> AttnplugBinding | None:
    """The attnplug binding installed on a ModelPatcher, if any."""
    to = model.model_options.get("transformer_options", {})
    fn = to.get(OVERRIDE)
    return getattr(fn, "__self__", None) if isinstance(getattr(fn, "__self__", None), AttnplugBinding) else None


def bind(model: Any, spec: SessionSpec) -> Any:
    """Clone `model` (a ComfyUI ModelPatcher) and bind a session built from `spec` to the clone.

    Returns the clone; the source patcher is untouched. A foreign override already present is kept
    as the exact path; an earlier attnplug binding is replaced (its own prior override is kept).
    """
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    prior = to.get(OVERRIDE)
    old = current_binding(m)
    if old is not None:
        log.info("attnplug: %s replaces the attnplug binding already on this model (%s)", spec.label,
                 old.handle.spec.label)
        prior = old.prior
        for kind in (CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP):
            m.remove_callbacks_with_key(kind, KEY)
        for kind in (WrappersMP.DIFFUSION_MODEL, WrappersMP.OUTER_SAMPLE):
            m.remove_wrappers_with_key(kind, KEY)
        patches = to.get("patches", {})
        if "attn1_patch" in patches:
            patches["attn1_patch"] = [p for p in patches["attn1_patch"]
                                      if not isinstance(getattr(p, "__self__", None), AttnplugBinding)]
    elif prior is not None:
        log.info("attnplug: %s keeps the attention override another node set (%s) as its exact path",
                 spec.label, getattr(prior, "__qualname__", type(prior).__name__))
    binding = AttnplugBinding(spec, prior)
    to[OVERRIDE] = binding.override
    m.set_model_attn1_patch(binding.attn1_patch)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, binding.diffusion_model_wrapper)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, binding.outer_sample_wrapper)
    m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, KEY, binding.on_pre_run)
    m.add_callback_with_key(CallbacksMP.ON_CLEANUP, KEY, binding.on_cleanup)
    return m
