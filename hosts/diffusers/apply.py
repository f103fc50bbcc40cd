"""`apply(pipe_or_transformer, config_or_session) -> Handle` and `Handle.remove()`.

`apply` swaps every attention processor whose attention call it can intercept for a per-layer
wrapper (processors.py), registers the sigma/step hook on the transformer and, given a pipeline,
brackets its `__call__` with run start/end (tracking.py). `Handle.remove()` puts back the very
processor objects that were there (identity), removes the hook, restores the pipeline's class,
and drops every reference attnplug held to the model.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...core import Config, Session, model_identity
from .layout import ModelLayout, layer_identity, layout_for
from .processors import LayerProcessor, LayerState, build_wrapper, interception_kind
from .tracking import Tracker, install_hook, install_pipeline, remove_hook, remove_pipeline

log = logging.getLogger("attnplug")

ConfigLike = "Config | str | Path | Mapping[str, Any]"


class Handle:
    """What `apply` returns: the session, the patched layers, and `remove()`.

    Use as a context manager to remove on exit (the session is also closed when `apply` built it).
    """

    def __init__(
        self,
        session: Session,
        owns_session: bool,
        transformer: torch.nn.Module,
        pipe: Any | None,
        tracker: Tracker,
        patched: dict[str, tuple[torch.nn.Module, Any, LayerProcessor]],
        skipped: dict[str, str],
    ) -> None:
        self.session = session
        self.owns_session = owns_session
        self.transformer: torch.nn.Module | None = transformer
        self.pipe = pipe
        self._tracker: Tracker | None = tracker
        self._patched = patched
        self._layers = {w._attnplug_state.layer_key: path for path, (_, _, w) in patched.items()}
        self._states = [w._attnplug_state for _, (_, _, w) in patched.items()]
        #: module path → why its processor was left alone (not interceptable)
        self.skipped = skipped
        self.removed = False

    @property
    def layers(self) -> dict[str, str]:
        """Layer key → module path of every attention module `apply` patched (kept after `remove`)."""
        return dict(self._layers)

    @property
    def layout(self) -> ModelLayout | None:
        return self._tracker.layout if self._tracker is not None else None

    def passthrough(self) -> dict[str, dict[str, int]]:
        """Per layer: calls sent straight to the host attention, by reason."""
        return {s.layer_key: dict(s.passthrough) for s in self._states if s.passthrough}

    def end_run(self) -> None:
        """End the session's current run (bare-transformer use; pipelines end runs by themselves)."""
        self.session.run_end()

    def remove(self) -> None:
        """Restore the original processors (the same objects), remove the hook and the pipeline wrapper.

        Idempotent. An open run is ended first. The session stays usable (e.g. `handle.session.save`).
        """
        if self.removed:
            return
        for path, (module, original, wrapper) in self._patched.items():
            wrapper._attnplug_state.active = False
            if module.processor is not wrapper:
                log.warning(
                    "attnplug: %s: its processor was replaced after apply (now %s); restoring the original",
                    path,
                    type(module.processor).__name__,
                )
            module.set_processor(original)
        self._patched = {}
        if self.transformer is not None:
            remove_hook(self.transformer)
        if self.pipe is not None:
            remove_pipeline(self.pipe)
        self.transformer = None
        self.pipe = None
        self._tracker = None
        self.session.run_end()
        self.removed = True

    def close(self) -> None:
        """`remove()`, then close the session when `apply` built it."""
        self.remove()
        if self.owns_session:
            self.session.close()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._patched)} layers"
        return f"attnplug.hosts.diffusers.Handle({state})"


def find_transformer(pipe_or_transformer: Any) -> tuple[torch.nn.Module, Any | None]:
    """The denoiser of a pipeline (or the model itself) and the pipeline (or None)."""
    obj = pipe_or_transformer
    if isinstance(obj, torch.nn.Module):
        return getattr(obj, "_orig_mod", obj), None  # unwrap torch.compile's OptimizedModule
    for name in ("transformer", "unet"):
        model = getattr(obj, name, None)
        if isinstance(model, torch.nn.Module):
            return getattr(model, "_orig_mod", model), obj
    raise TypeError(
        f"attnplug.hosts.diffusers.apply: expected a diffusers pipeline with a `transformer` or a "
        f"transformer model (torch.nn.Module), got {type(obj).__name__}"
    )


def apply(
    pipe_or_transformer: Any,
    config_or_session: Session | Config | str | Path | Mapping[str, Any],
    *,
    text_first: bool | None = None,
    timestep_divisor: float | None = None,
    policy: Any = None,
    policy_threshold: float | None = None,
    policy_mode: str | None = None,
) -> Handle:
    """Route every interceptable attention call of a diffusers pipeline or transformer through attnplug.

    Args:
        pipe_or_transformer: a pipeline (FluxPipeline, Flux2Pipeline, QwenImagePipeline,
            StableDiffusion3Pipeline, ...) or its transformer.
        config_or_session: a config (TOML/JSON path, dict, `Config`) or an existing `Session`.
        text_first: token order of the joint sequence, for models attnplug does not know
            (default: from the model table; unknown models report no conditioning split).
        timestep_divisor: sigma = transformer `timestep` / this, for models attnplug does not know
            (Flux-style models take sigma itself: 1; SD3 takes sigma × 1000: 1000).
        policy: a routing policy (`RoutingPolicy` or a file written by `attnplug controller train`) that decides
            per step which layers serve; a policy (given or configured) for other layers is refused.
        policy_threshold: the quality/speed knob of the policy (higher: fewer layers served, closer to exact).
        policy_mode: 'threshold' or 'stochastic' (default: the config's `[plugins.controller] policy_mode`).

    Returns a `Handle`; `handle.remove()` restores the model exactly.
    """
    transformer, pipe = find_transformer(pipe_or_transformer)
    owns = not isinstance(config_or_session, Session)
    session = Session(config_or_session) if owns else config_or_session  # type: ignore[arg-type]
    layout = layout_for(transformer, text_first, timestep_divisor)
    tracker = Tracker(session, transformer, layout, pipe)

    targets: list[tuple[str, torch.nn.Module, Any]] = []
    skipped: dict[str, str] = {}
    for path, module in transformer.named_modules():
        if not (hasattr(module, "set_processor") and hasattr(module, "processor")):
            continue
        proc = module.processor
        if isinstance(proc, LayerProcessor):
            raise ValueError(
                f"attnplug is already applied to {path} ({proc!r}); remove the first handle first"
            )
        kind = interception_kind(proc)
        if kind is None:
            skipped[path] = (
                f"processor {type(proc).__name__} neither calls dispatch_attention_fn nor is a known "
                "SDPA processor"
            )
            continue
        targets.append((path, module, kind))
    if not targets:
        raise ValueError(
            f"attnplug.hosts.diffusers.apply: no attention processor of {type(transformer).__name__} "
            f"can be intercepted ({len(skipped)} skipped: {_summary(skipped)})"
        )

    keys = sorted({layer_identity(path)[0] for path, _, _ in targets})
    try:
        _attach_policy(session, keys, policy, policy_threshold, policy_mode)
    except BaseException:
        if owns:
            session.close()
        raise
    install_hook(transformer, tracker)
    patched: dict[str, tuple[torch.nn.Module, Any, LayerProcessor]] = {}
    try:
        for path, module, kind in targets:
            key, block_type, block_index = layer_identity(path)
            state = LayerState(session, tracker.state, layout, path, key, block_type, block_index, None, None)
            original = module.processor
            wrapper = build_wrapper(original, state, kind)
            module.set_processor(wrapper)
            patched[path] = (module, original, wrapper)
        if pipe is not None:
            install_pipeline(pipe, tracker)
    except BaseException:
        for module, original, _ in patched.values():
            module.set_processor(original)
        remove_hook(transformer)
        raise
    session.bind_model(transformer_fingerprints(transformer))
    session.check_layers(keys)  # patterns matching none
    if skipped:
        log.warning(
            "attnplug: %d attention modules of %s keep their own processor: %s",
            len(skipped),
            type(transformer).__name__,
            _summary(skipped),
        )
    if not session.training:
        for note in session.serving_notes():
            log.info("attnplug: %s", note)
    return Handle(session, owns, transformer, pipe, tracker, patched, skipped)


#: the projections whose weights make an attention module's q and k (diffusers' names; the joint blocks' text stream
#: has its own)
QK_PROJECTIONS = ("to_q", "to_k", "add_q_proj", "add_k_proj", "to_qkv")


def transformer_fingerprints(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`{layer_key: fingerprint}` of each attention module's q and k projection weights (`core.model_identity`):
    which model a checkpoint's layers were distilled on. Modules without those projections get none."""
    out: dict[str, torch.Tensor] = {}
    for path, module in transformer.named_modules():
        if not (hasattr(module, "set_processor") and hasattr(module, "processor")):
            continue
        weights = [getattr(getattr(module, name), "weight") for name in QK_PROJECTIONS
                   if isinstance(getattr(getattr(module, name, None), "weight", None), torch.Tensor)]
        if weights and not any(w.is_meta for w in weights):  # offloaded to the meta device: nothing to read
            with torch.no_grad():
                out[layer_identity(path)[0]] = model_identity.fingerprint(weights)
    return out


def _attach_policy(session: Session, keys: list[str], policy: Any, threshold: float | None,
                   mode: str | None) -> None:
    """Check the routing policy (given or configured) against the model's layers and set its knob."""
    from ...plugins.controller.policy_gate import attach_policy, policy_gate

    gate = policy_gate(session)
    if gate is None or (policy is None and gate.policy is None):
        if policy is not None or threshold is not None or mode is not None:
            raise ValueError("attnplug.hosts.diffusers.apply: policy options need the controller plugin's policy "
                             "gate (is the 'controller' plugin disabled?)" if gate is None else
                             "attnplug.hosts.diffusers.apply: policy_threshold / policy_mode given without a policy")
        return
    attach_policy(session, policy, keys, threshold=threshold, mode=mode)


def _summary(skipped: dict[str, str]) -> str:
    counts = Counter(skipped.values())
    return "; ".join(f"{n}× {reason}" for reason, n in counts.items()) or "none"
