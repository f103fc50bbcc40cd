"""Routing-policy files: safetensors with the weights, and for resuming the optimizer, the baseline and λ.

Components (core/checkpoint.py's format, written atomically by its `save_checkpoint`):
- `controller.policy`: the network's tensors; metadata: format, version, the architecture (its layer list,
  text width, use_text, hidden width), the training settings it was trained with, and counters;
- `controller.policy_training` (optional): AdamW's state tensors; metadata: the reward baseline and scale,
  λ, updates, episodes. Present in files written by the trainer; resuming needs it.

A policy decides a fixed list of layers: loading one for another layer set is refused (`PolicyLayersError`,
a `ConfigError` naming the file and both sets), never silently re-mapped.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ...core.checkpoint import CheckpointError, MetaReader, load_checkpoint, require_finite, save_checkpoint
from ...core.config import ConfigError
from .policy import RoutingPolicy

POLICY_COMPONENT = "controller.policy"
TRAINING_COMPONENT = "controller.policy_training"
POLICY_FORMAT = "attnplug-routing-policy"
POLICY_VERSION = 1


class PolicyLayersError(ConfigError):
    """A policy file decides another set of layers than the model (or the run it should resume) has."""

    def __init__(self, path: Path, have: Sequence[str], want: Sequence[str]) -> None:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        problem = (f"routing policy {path} was trained for another layer set: it decides {len(have)} layers "
                   f"{_short(have)}, this model has {len(want)} {_short(want)} (missing from the file: "
                   f"{_short(missing)}; not in this model: {_short(extra)}); train a policy for this model")
        self.source, self.problems = str(path), [problem]
        ValueError.__init__(self, problem)


def _short(keys: Sequence[str], n: int = 6) -> str:
    keys = list(keys)
    return "[" + ", ".join(keys[:n]) + (f", … {len(keys) - n} more" if len(keys) > n else "") + "]"


@dataclass
class TrainingState:
    """What a resumed training continues from (besides the weights)."""

    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    baseline: float | None = None
    reward_scale: float | None = None
    lagrange: float = 1.0
    updates: int = 0
    episodes: int = 0


@dataclass
class PolicyFile:
    """A loaded policy file: the network, its training settings (JSON), and the training state when saved."""

    policy: RoutingPolicy
    settings: dict[str, Any]
    training: TrainingState | None
    meta: dict[str, Any]


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as named tensors `state.<param index>.<name>`."""
    out: dict[str, torch.Tensor] = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"state.{idx}.{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put `flatten_optimizer`'s tensors back (the param groups' settings stay the optimizer's own)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    current = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in current["param_groups"])
    if any(i >= n_params for i in state):
        raise CheckpointError(f"{source}: optimizer state for {max(state) + 1} parameters, the policy has {n_params}")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def save_policy(path: str | Path, policy: RoutingPolicy, settings: dict[str, Any] | None = None,
                training: TrainingState | None = None) -> Path:
    """Write `policy` (and, when given, its training state) to `path` atomically."""
    meta = {"format": POLICY_FORMAT, "version": POLICY_VERSION, "architecture": policy.describe(),
            "settings": settings or {}, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")}
    tensors = {k: v.detach() for k, v in policy.state_dict().items()}
    components: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {POLICY_COMPONENT: (tensors, meta)}
    if training is not None:
        components[TRAINING_COMPONENT] = (dict(training.optimizer), {
            "baseline": training.baseline, "reward_scale": training.reward_scale, "lagrange": training.lagrange,
            "updates": training.updates, "episodes": training.episodes})
    return save_checkpoint(path, components)


def load_policy(path: str | Path, layers: Sequence[str] | None = None) -> PolicyFile:
    """Read a policy file; `layers`: the layer keys it must decide (refused otherwise, `PolicyLayersError`).

    Every other problem is a `CheckpointError` naming the file and the field or tensor."""
    path = Path(path)
    comps = load_checkpoint(path)
    if POLICY_COMPONENT not in comps:
        raise CheckpointError(f"{path}: no {POLICY_COMPONENT!r} component (components: {sorted(comps)}); not a "
                              "routing policy written by `attnplug controller train`")
    tensors, meta = comps[POLICY_COMPONENT]
    where = f"routing policy {path}"
    try:
        description = _architecture(MetaReader(meta))
        training = _training(comps[TRAINING_COMPONENT][1]) if TRAINING_COMPONENT in comps else None
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if layers is not None and set(description["layers"]) != set(layers):
        raise PolicyLayersError(path, description["layers"], list(layers))
    try:
        policy = RoutingPolicy.from_description(description)
    except ValueError as exc:
        raise CheckpointError(f"{where}: field architecture: {exc}") from None
    require_finite(tensors, f"{where}: tensor")
    try:
        policy.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: its tensors do not fit its architecture ({exc})") from None
    if training is not None:
        training.optimizer = dict(comps[TRAINING_COMPONENT][0])
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    return PolicyFile(policy, settings, training, meta)


def _architecture(r: MetaReader) -> dict[str, Any]:
    if r.get_str("format") != POLICY_FORMAT:
        raise CheckpointError(f"field format: {r.data.get('format')!r}, expected {POLICY_FORMAT!r}")
    if r.get_int("version") != POLICY_VERSION:
        raise CheckpointError(f"field version: {r.data.get('version')!r}; this attnplug reads {POLICY_VERSION}")
    arch = r.get_obj("architecture")
    text_dim = None if arch.data.get("text_dim") is None else arch.get_int("text_dim", lo=1)
    return {"layers": arch.get_str_list("layers"), "text_dim": text_dim, "use_text": arch.get_bool("use_text"),
            "hidden": arch.get_int("hidden", lo=4, hi=4096), "init_logit": arch.get_float("init_logit", 1.0)}


def _training(meta: dict[str, Any]) -> TrainingState:
    r = MetaReader(meta, TRAINING_COMPONENT)
    return TrainingState({}, r.get_float("baseline", None, optional=True),
                         r.get_float("reward_scale", None, lo=0.0, optional=True), r.get_float("lagrange", lo=0.0),
                         r.get_int("updates", lo=0), r.get_int("episodes", lo=0))
