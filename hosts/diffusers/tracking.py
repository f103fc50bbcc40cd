"""Where sampling is: a transformer pre-forward hook (sigma, step, text length, grid, cond/uncond) and
a pipeline-call wrapper (run start and run end).

Neither sigma nor the step reaches an attention processor, so a diffusers `ModelHook` on the
transformer reads them from `forward`'s arguments once per transformer call, and every layer reads
the shared `StepState`. The hook is stateful so that diffusers' `transformer.cache_context("cond" |
"uncond")` — which Flux, QwenImage and other pipelines wrap around each denoiser call — reaches it
and tells the conditional from the unconditional pass.

Runs: while a pipeline call is in flight (the pipeline's class is swapped for a thin subclass whose
`__call__` brackets the original), the run starts at the first transformer call — when the pipeline
has already set its timesteps, so `num_steps` is known — and ends when `__call__` returns or raises.
Without a pipeline (a bare transformer), steps are counted from timestep changes and the session
detects new runs by itself (the step index falls back to 0 when the timestep rises).
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager

from .layout import ModelLayout

if TYPE_CHECKING:
    from ...core import Session

log = logging.getLogger("attnplug")

HOOK_NAME = "attnplug_step"
TRACKER_ATTR = "_attnplug_tracker"


@dataclass
class StepState:
    """What the transformer call in flight tells every attention layer (one per `apply`)."""

    version: int = 0
    raw_timestep: float | None = None
    sigma: float | None = None
    step_index: int | None = None
    num_steps: int | None = None
    cond: bool | None = None
    cfg_scale: float | None = None
    n_txt: int | None = None
    latent_grid: tuple[int, int] | None = None
    # pipeline-call state
    pipe_depth: int = 0
    run_started: bool = False
    pipe_info: dict[str, Any] = field(default_factory=dict)


class _ContextRecorder(StateManager):
    """Receives diffusers' cache context (`transformer.cache_context(name)`); keeps only its name."""

    def __init__(self) -> None:
        super().__init__(_NoState)
        self.name: str | None = None

    def set_context(self, context: Any) -> None:
        self.name = getattr(context, "name", None)

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.name = None


class _NoState:
    def reset(self) -> None:
        """Nothing to reset."""


class StepHook(ModelHook):
    """Transformer pre-forward hook: fills `StepState` from the forward arguments."""

    _is_stateful = True

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.context = _ContextRecorder()

    def pre_forward(
        self, module: torch.nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any], dict[str, Any]]:
        _observe_forward(self.tracker, self.context.name, args, kwargs)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.reset()
        return module


class Tracker:
    """Owns the `StepState` of one `apply`: fed by the transformer hook and the pipeline wrapper."""

    def __init__(
        self, session: Session, transformer: torch.nn.Module, layout: ModelLayout, pipe: Any | None = None
    ) -> None:
        self.session = session
        self.layout = layout
        self.state = StepState()
        self._pipe = weakref.ref(pipe) if pipe is not None else None
        params = [p for p in inspect.signature(type(transformer).forward).parameters.values()][1:]
        self._positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._patch = int(getattr(getattr(transformer, "config", None), "patch_size", 1) or 1)
        self._grid_cache: tuple[weakref.ref[torch.Tensor], int, tuple[int, int] | None] | None = None

    @property
    def pipe(self) -> Any | None:
        return self._pipe() if self._pipe is not None else None

    # ---- transformer calls ---------------------------------------------------------------------
    def named_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        named = dict(zip(self._positional, args))
        named.update(kwargs)
        return named

    def observe(self, context_name: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        st = self.state
        a = self.named_args(args, kwargs)
        st.version += 1
        raw = _first_float(a.get("timestep"))
        in_pipe = st.pipe_depth > 0
        if raw is not None:
            if st.raw_timestep is None or st.step_index is None:
                st.step_index = 0
            elif raw > st.raw_timestep + 1e-9 and not in_pipe:
                st.step_index = 0  # a new sampling run on a bare transformer
            elif raw != st.raw_timestep:
                st.step_index += 1
            st.raw_timestep = raw
        divisor = self.layout.timestep_divisor
        st.sigma = raw / divisor if raw is not None and divisor else None
        ehs = a.get("encoder_hidden_states")
        st.n_txt = int(ehs.shape[1]) if isinstance(ehs, torch.Tensor) and ehs.dim() >= 2 else None
        st.latent_grid = self._grid(a)
        pipe = self.pipe if in_pipe else None
        st.cond = _cond(context_name, pipe)
        st.cfg_scale = self._cfg(a, pipe)
        if st.cond is not False:  # the prompt's pooled embedding (Flux: CLIP's), else its tokens; a reference only
            pooled = a.get("pooled_projections")
            self.session.offer_text(pooled if isinstance(pooled, torch.Tensor) else
                                    ehs if isinstance(ehs, torch.Tensor) else None)
        if in_pipe and not st.run_started:
            st.num_steps = _num_steps(pipe)
            st.run_started = True
            self.session.run_start(
                num_steps=st.num_steps,
                host="diffusers",
                pipeline=type(pipe).__name__ if pipe is not None else None,
            )
        elif not in_pipe:
            st.num_steps = None

    def _cfg(self, a: dict[str, Any], pipe: Any | None) -> float | None:
        info = self.state.pipe_info
        if info.get("true_cfg", False):
            return float(info["true_cfg_scale"])
        guidance = _first_float(a.get("guidance"))
        if guidance is not None:
            return guidance
        if pipe is not None and getattr(pipe, "do_classifier_free_guidance", False) is True:
            value = getattr(pipe, "_guidance_scale", None)
            return float(value) if isinstance(value, (int, float)) else None
        return None

    def _grid(self, a: dict[str, Any]) -> tuple[int, int] | None:
        ids = a.get("img_ids")
        if isinstance(ids, torch.Tensor):
            # cached per tensor object (a weak reference: a freed tensor's id and address can come
            # back with other ids) and version (in-place writes)
            cached = self._grid_cache
            if cached is not None and cached[0]() is ids and cached[1] == ids._version:
                return cached[2]
            grid = grid_from_ids(ids)
            self._grid_cache = (weakref.ref(ids), ids._version, grid)
            return grid
        shapes = a.get("img_shapes")
        if isinstance(shapes, (list, tuple)) and shapes:
            first = shapes[0]
            if isinstance(first, (list, tuple)) and len(first) == 1:
                first = first[0]
            if isinstance(first, (list, tuple)) and len(first) == 3 and int(first[0]) == 1:
                return int(first[1]), int(first[2])
            return None
        hs = a.get("hidden_states")
        if (
            isinstance(hs, torch.Tensor) and hs.dim() == 4
        ):  # SD3-style [B, C, H, W] latents, patchified inside
            return int(hs.shape[2]) // self._patch, int(hs.shape[3]) // self._patch
        return None

    # ---- pipeline calls ------------------------------------------------------------------------
    def pipeline_enter(self, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        st = self.state
        st.pipe_depth += 1
        if st.pipe_depth > 1:
            return
        if self.session.run is not None:
            self.session.run_end()  # a run left open by bare transformer calls
        st.run_started = False
        st.raw_timestep = None
        st.step_index = None
        st.pipe_info = _pipe_info(pipe, args, kwargs)

    def pipeline_exit(self) -> None:
        st = self.state
        st.pipe_depth -= 1
        if st.pipe_depth > 0:
            return
        st.pipe_info = {}
        st.raw_timestep = None
        st.step_index = None
        if st.run_started:
            st.run_started = False
            self.session.run_end()


@torch.compiler.disable
def _observe_forward(
    tracker: Tracker, context_name: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Eager (outside any torch.compile graph): reads Python floats from the timestep tensor. While a CUDA graph
    is being captured (reading a device tensor would sync, which capture forbids) the step state of the last eager
    forward stands: a captured forward replays that step."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    tracker.observe(context_name, args, kwargs)


def grid_from_ids(ids: torch.Tensor) -> tuple[int, int] | None:
    """Token grid `(h, w)` of the target image from Flux-style position ids.

    Flux: `[N, 3]` rows `(0, h, w)`; Flux2: `[B, N, 4]` rows `(t, h, w, l)`. Reference images
    (Kontext, Flux2 edit) carry another first coordinate and are left out. None when the target
    tokens do not fill a full rectangle.
    """
    if ids.dim() == 3:
        ids = ids[0]
    if ids.dim() != 2 or ids.shape[1] < 3 or ids.shape[0] == 0:
        return None
    target = ids[ids[:, 0] == ids[0, 0]]
    rows, cols = target[:, 1], target[:, 2]
    h = int(rows.max() - rows.min()) + 1
    w = int(cols.max() - cols.min()) + 1
    return (h, w) if h * w == target.shape[0] else None


def _first_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().flatten()[0]) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _cond(context_name: str | None, pipe: Any | None) -> bool | None:
    if context_name == "cond":
        return True
    if context_name == "uncond":
        return False
    if pipe is not None:
        cfg = getattr(type(pipe), "do_classifier_free_guidance", None)
        if isinstance(cfg, property):
            try:
                return None if pipe.do_classifier_free_guidance else True
            except Exception:  # noqa: BLE001 - a property that needs state the pipeline has not set
                return None
    return None


def _num_steps(pipe: Any | None) -> int | None:
    """Steps of the run, read when the pipeline has set its timesteps (first transformer call)."""
    if pipe is None:
        return None
    n = pipe.__dict__.get("_num_timesteps")
    if isinstance(n, int) and n > 0:
        return n
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    if isinstance(timesteps, torch.Tensor) and timesteps.dim() == 1 and len(timesteps) > 0:
        return len(timesteps)
    return None


def _pipe_info(pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """True CFG (Flux, QwenImage): `true_cfg_scale > 1` with a negative prompt given."""
    try:
        bound = inspect.signature(type(pipe).__call__).bind_partial(pipe, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
    except (TypeError, ValueError):
        return {}
    scale = a.get("true_cfg_scale")
    has_negative = a.get("negative_prompt") is not None or a.get("negative_prompt_embeds") is not None
    if isinstance(scale, (int, float)) and scale > 1 and has_negative:
        return {"true_cfg": True, "true_cfg_scale": float(scale)}
    return {}


# ---- installing and removing -----------------------------------------------------------------------


def install_hook(transformer: torch.nn.Module, tracker: Tracker) -> StepHook:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        raise ValueError(
            f"attnplug is already applied to this {type(transformer).__name__} (hook {HOOK_NAME!r} "
            "is registered); remove the first handle before applying again"
        )
    hook = StepHook(tracker)
    registry.register_hook(hook, HOOK_NAME)
    registry.invalidate_child_registries_cache()
    return hook


def remove_hook(transformer: torch.nn.Module) -> None:
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(HOOK_NAME, recurse=False)
    # HookRegistry leaves `forward` as an instance attribute (the bound method);
    # drop it when nothing else hooks the module.
    fwd = transformer.__dict__.get("forward")
    if (
        not registry.hooks
        and getattr(fwd, "__func__", None) is type(transformer).forward
        and getattr(fwd, "__self__", None) is transformer
    ):
        del transformer.__dict__["forward"]


_PIPE_CLASSES: dict[type, type] = {}


def _tracked_class(cls: type) -> type:
    """A subclass of the pipeline class whose `__call__` brackets the original with run start/end."""
    sub = _PIPE_CLASSES.get(cls)
    if sub is not None:
        return sub
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        tracker = self.__dict__.get(TRACKER_ATTR)
        if tracker is None:
            return original(self, *args, **kwargs)
        tracker.pipeline_enter(self, args, kwargs)
        try:
            return original(self, *args, **kwargs)
        finally:
            tracker.pipeline_exit()

    sub = type(
        cls.__name__,
        (cls,),
        {
            "__call__": __call__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "_attnplug_base": cls,
        },
    )
    _PIPE_CLASSES[cls] = sub
    return sub


def install_pipeline(pipe: Any, tracker: Tracker) -> None:
    if TRACKER_ATTR in pipe.__dict__:
        raise ValueError(
            f"attnplug is already applied to this {type(pipe).__name__}; remove the first handle"
        )
    cls = type(pipe)
    object.__setattr__(pipe, "__class__", _tracked_class(cls))
    pipe.__dict__[TRACKER_ATTR] = tracker


def remove_pipeline(pipe: Any) -> None:
    pipe.__dict__.pop(TRACKER_ATTR, None)
    base = type(pipe).__dict__.get("_attnplug_base")
    if base is not None:
        object.__setattr__(pipe, "__class__", base)
