"""One layer's training step: Kendall-weighted loss, per-layer AdamW, log-variances, clipping.

Loss (Kendall, Gal & Cipolla 2018 — learned homoscedastic uncertainty weights):
    L = huber / (2·e^{s_h}) + s_h / 2 + c / (2·e^{s_c}) + s_c / 2
with huber = Smooth-L1(β) between student and teacher, and c = mean over tokens and heads of the
cosine distance 1 − cos(student, teacher) over the head dimension. s_h starts at 0 and s_c at −1,
so the cosine term (sparser, per-token directional signal) weighs more at first.

Optimizers (one set per layer, so layers train and resume independently):
- AdamW over the backend's `param_groups(layer_key)`: "phi" at `lr` with weight decay, "alpha" at
  `lr * alpha_lr_mult` without weight decay (decay would pull the blend logit toward α = α_max/2);
- a separate AdamW for the two log-variances, no weight decay, never clipped;
- gradients of the layer parameters are clipped to `grad_clip` (global norm) before the step;
- learning-rate schedule per layer, by the layer's own update count t: "constant", or "cosine" —
  lr·(r + (1 − r)·½(1 + cos(π·min(t / T, 1)))) with T = `lr_decay_updates` and r = `lr_min_ratio`,
  then constant at lr·r (an online distiller never knows its last update, so it anneals and stays).

Everything here runs inside `torch.inference_mode(False)` + `torch.enable_grad()`; parameters that
turn out to be inference tensors (a module built under the host's inference mode) are rebuilt as
normal parameters first, and the optimizer with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ...core.backend import LearnedBackend


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    alpha_lr_mult: float
    weight_decay: float
    lr_logvar: float
    grad_clip: float
    huber_beta: float
    logvar_init: tuple[float, float]
    lr_schedule: str = "constant"
    lr_decay_updates: int = 0
    lr_min_ratio: float = 0.0

    def lr_factor(self, updates: int) -> float:
        """Multiplier of the base learning rates after `updates` updates of a layer (see module docs)."""
        if self.lr_schedule == "constant" or self.lr_decay_updates <= 0:
            return 1.0
        t = min(updates / self.lr_decay_updates, 1.0)
        r = self.lr_min_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t))


def kendall_loss(
    student: torch.Tensor, teacher: torch.Tensor, logvars: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, huber, cosine distance) of `[B, H, nq, D]` student vs teacher; `logvars` = [s_h, s_c]."""
    huber = F.smooth_l1_loss(student, teacher, beta=beta)
    cos_dist = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8).mean()
    s_h, s_c = logvars[0], logvars[1]
    total = huber * 0.5 * torch.exp(-s_h) + 0.5 * s_h + cos_dist * 0.5 * torch.exp(-s_c) + 0.5 * s_c
    return total, huber, cos_dist


def repair_inference_params(module: torch.nn.Module) -> bool:
    """Replace inference-tensor parameters/buffers of `module` by normal copies. True if any was."""
    changed = False
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(
                        p.detach().clone(), requires_grad=p.requires_grad
                    )
                    changed = True
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.detach().clone()
                    changed = True
    return changed


class TrainSync(Protocol):
    """What data-parallel training (`distill_parallel.py`) does at the points of an update where ranks meet."""

    def start(self, layer_key: str, backend: LearnedBackend, logvars: torch.Tensor) -> None:
        """A layer's trainer was built: make its weights the same on every rank."""
        ...

    def all_finite(self, finite: bool) -> bool:
        """Whether every rank's loss is finite (all skip the update together)."""
        ...

    def gradients(self, params: list[torch.Tensor]) -> None:
        """Average the gradients over the ranks, in place, before clipping."""
        ...

    def finish(self, layer_key: str, backend: LearnedBackend, loss: float, cos: float) -> tuple[float, float]:
        """After the step: keep per-rank statistics (the running reference of d) equal; the ranks' mean loss and
        cosine distance (what readiness records, identical everywhere)."""
        ...


class LayerTrainer:
    """Optimizer state and log-variances of one layer; `update` runs one training step."""

    def __init__(
        self, layer_key: str, backend: LearnedBackend, cfg: OptimConfig, device: torch.device,
        sync: TrainSync | None = None,
    ) -> None:
        self.layer_key = layer_key
        self.cfg = cfg
        #: data-parallel training: where the ranks meet during an update (None: one process)
        self.sync = sync
        with torch.inference_mode(False):
            self.logvars = torch.nn.Parameter(
                torch.tensor(cfg.logvar_init, dtype=torch.float32, device=device)
            )
            self.logvar_opt = torch.optim.AdamW([self.logvars], lr=cfg.lr_logvar, weight_decay=0.0)
        self.build_optimizer(backend)
        if sync is not None:
            sync.start(layer_key, backend, self.logvars)

    def build_optimizer(self, backend: LearnedBackend) -> None:
        """(Re)build the layer AdamW from the backend's current parameter groups."""
        groups = backend.param_groups(self.layer_key)
        unknown = set(groups) - {"phi", "alpha"}
        if unknown:
            raise ValueError(
                f"layer {self.layer_key}: param_groups returned unknown groups {sorted(unknown)}; "
                "expected 'phi' and 'alpha'"
            )
        self.params: list[torch.nn.Parameter] = [*groups.get("phi", []), *groups.get("alpha", [])]
        if not self.params:
            raise ValueError(f"layer {self.layer_key}: the backend has no trainable parameters")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError(f"layer {self.layer_key}: a parameter appears in more than one param group")
        spec = []
        if groups.get("phi"):
            spec.append(
                {
                    "params": list(groups["phi"]),
                    "lr": self.cfg.lr,
                    "weight_decay": self.cfg.weight_decay,
                    "name": "phi",
                    "base_lr": self.cfg.lr,
                }
            )
        if groups.get("alpha"):
            spec.append(
                {
                    "params": list(groups["alpha"]),
                    "lr": self.cfg.lr * self.cfg.alpha_lr_mult,
                    "weight_decay": 0.0,
                    "name": "alpha",
                    "base_lr": self.cfg.lr * self.cfg.alpha_lr_mult,
                }
            )
        with torch.inference_mode(False):
            self.opt = torch.optim.AdamW(spec)

    def ensure_trainable(self, backend: LearnedBackend) -> None:
        """Rebuild inference-tensor parameters (and the optimizer, keeping its state) when needed."""
        module = backend.layers.get(self.layer_key)
        if module is None or not any(p.is_inference() for p in module.parameters()):
            return
        saved = self.flat_state()
        repair_inference_params(module)
        self.build_optimizer(backend)
        self.load_flat_state(saved)

    def update(
        self, backend: LearnedBackend, tensors: dict[str, Any], call: Any
    ) -> tuple[float, float, torch.Tensor]:
        """One optimizer step on one sample; returns (loss, cosine distance, detached student output)."""
        self._sync_device()
        factor = self.cfg.lr_factor(self.updates)
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        with torch.inference_mode(False), torch.enable_grad():
            self.opt.zero_grad(set_to_none=True)
            self.logvar_opt.zero_grad(set_to_none=True)
            positions = tensors.get("query_index")  # a query subset: where its rows sit (None: all)
            extra = {} if positions is None else {"query_index": positions}
            out = backend.train_forward(
                self.layer_key, tensors["q"], tensors["k"], tensors["v"], call, tensors["mask"], **extra
            )
            if out.shape != tensors["teacher"].shape:
                raise ValueError(
                    f"layer {self.layer_key}: train_forward returned {tuple(out.shape)}, "
                    f"expected the teacher's shape {tuple(tensors['teacher'].shape)}"
                )
            total, _huber, cos_dist = kendall_loss(
                out.float(), tensors["teacher"], self.logvars, self.cfg.huber_beta
            )
            finite = bool(torch.isfinite(total))
            if self.sync is not None:
                finite = self.sync.all_finite(finite)
            if not finite:
                self.opt.zero_grad(set_to_none=True)
                return float("nan"), float("nan"), out.detach()
            total.backward()
            if self.sync is not None:
                self.sync.gradients([*self.params, self.logvars])
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.opt.step()
            self.logvar_opt.step()
            loss, cos = torch.stack([total.detach(), cos_dist.detach()]).tolist()
            if self.sync is not None:
                loss, cos = self.sync.finish(self.layer_key, backend, loss, cos)
        return loss, cos, out.detach()

    @property
    def updates(self) -> int:
        """Optimizer steps this layer has taken (drives the lr schedule): AdamW's own step count, so it
        is saved and restored with the optimizer state."""
        steps = [float(st["step"]) for st in self.opt.state.values() if "step" in st]
        return int(max(steps, default=0.0))

    def _sync_device(self) -> None:
        """Move optimizer state to its parameters' device (the module may have moved since)."""
        for opt in (self.opt, self.logvar_opt):
            for group in opt.param_groups:
                for p in group["params"]:
                    st = opt.state.get(p)
                    if not st:
                        continue
                    for key, val in st.items():
                        if torch.is_tensor(val) and key != "step" and val.device != p.device:
                            st[key] = val.to(p.device)
        if self.logvars.device != self.params[0].device:
            with torch.inference_mode(False):
                self.logvars.data = self.logvars.data.to(self.params[0].device)
                for key, val in self.logvar_opt.state.get(self.logvars, {}).items():
                    if torch.is_tensor(val) and key != "step":
                        self.logvar_opt.state[self.logvars][key] = val.to(self.params[0].device)

    # ---- state -----------------------------------------------------------------------------------
    def flat_state(self) -> dict[str, torch.Tensor]:
        """Optimizer states as named tensors (`opt/<i>/<key>`, `logvar_opt/0/<key>`) plus `logvars`."""
        out: dict[str, torch.Tensor] = {"logvars": self.logvars.detach().clone()}
        for prefix, opt in (("opt", self.opt), ("logvar_opt", self.logvar_opt)):
            for idx, st in opt.state_dict()["state"].items():
                for key, val in st.items():
                    out[f"{prefix}/{idx}/{key}"] = (
                        (val if torch.is_tensor(val) else torch.tensor(val)).detach().clone()
                    )
        return out

    def param_shapes(self) -> list[list[int]]:
        return [list(p.shape) for p in self.params]

    def load_flat_state(self, flat: dict[str, torch.Tensor]) -> None:
        """Inverse of `flat_state`; raises ValueError naming the first tensor that does not fit."""
        with torch.inference_mode(False):
            if "logvars" in flat:
                lv = flat["logvars"]
                if lv.shape != self.logvars.shape:
                    raise ValueError(
                        f"layer {self.layer_key}: logvars shape {tuple(lv.shape)}, expected (2,)"
                    )
                self.logvars.data.copy_(lv.to(self.logvars.device))
            for prefix, opt, params in (
                ("opt", self.opt, self.params),
                ("logvar_opt", self.logvar_opt, [self.logvars]),
            ):
                state: dict[int, dict[str, torch.Tensor]] = {}
                for name, val in flat.items():
                    head, _, rest = name.partition("/")
                    if head != prefix:
                        continue
                    idx_s, _, key = rest.partition("/")
                    idx = int(idx_s)
                    if idx >= len(params):
                        raise ValueError(
                            f"layer {self.layer_key}: optimizer state {name} for parameter {idx}, but "
                            f"the layer has {len(params)} parameters"
                        )
                    if key != "step" and tuple(val.shape) != tuple(params[idx].shape):
                        raise ValueError(
                            f"layer {self.layer_key}: optimizer state {name} has shape {tuple(val.shape)}, "
                            f"parameter {idx} has {tuple(params[idx].shape)}"
                        )
                    state.setdefault(idx, {})[key] = val.detach().clone()
                sd = opt.state_dict()
                sd["state"] = state
                opt.load_state_dict(sd)
