"""The product's default ttr layer at a Flux size, as the kernel tools (`profile_kernels`, `tune`) run it.

Its φ comes from `TtrSettings()` (depth, hidden width, feature dim, activation; random weights) and its
landmarks and window from `LandmarkSettings()` through the landmark plugin's own selection, so these tools
always time what a user gets by default. `LayerInputs.fused(...)` is one fused layer call; `LayerInputs.joint(...)`
is the joint layer's call (a double block's: the same exact set and window, the learned part image↔image only).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..plugins.landmark.backend import LandmarkBackend
from ..plugins.landmark.settings import LandmarkSettings
from ..plugins.ttr.kernels import (JointServePlan, KernelConfig, PhiWeights, ServePlan, fused_unsupported_reasons,
                                   random_phi)
from ..plugins.ttr.settings import TtrSettings
from .run import parse_shape
from .variants import _call, stand_in_reference

TEXT_TOKENS = 512  # Flux's T5 tokens, first in the sequence


@dataclass
class LayerInputs:
    """q, k, v `[1, 24, N, 128]` bf16 at one size, the default φ pair, landmark indices and window."""

    size: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    phi_q: PhiWeights
    phi_k: PhiWeights
    landmarks: torch.Tensor
    window: int
    grid: tuple[int, int]
    d_reference: torch.Tensor | None = None  # adaptive α against a running mean of d: one pass (else two)
    exact_fp8: bool = False  # the exact branch in e4m3 (`[plugins.landmark] precision = "fp8"`)

    @property
    def description(self) -> str:
        return (f"{self.size}: {self.q.shape[2]} tokens, {self.landmarks.numel()} landmarks, window {self.window}, "
                f"φ {self.phi_q.depth} layer(s) → F {self.phi_q.feature_dim}, α's d against "
                f"{'the call mean' if self.d_reference is None else 'a running mean'}")

    def fused(self, config: KernelConfig | None = None, landmark_impl: str | None = "auto",
              window: bool = True) -> Callable[[], torch.Tensor]:
        """One fused layer call: with landmarks through `landmark_impl` (None: kernel-only, no window), from a serve
        plan built at the first call (as a served layer keeps it: the calls time the launches alone)."""
        lm = None if landmark_impl is None else self.landmarks
        kw = {"window": self.window, "grid": self.grid, "n_cond": TEXT_TOKENS} \
            if window and landmark_impl is not None and self.window else {}
        return self._planned_call(lm, kw.get("window", 0), lambda: ServePlan(
            self.q, self.k, self.v, self.phi_q, self.phi_k, landmark_idx=lm, config=config,
            landmark_impl=landmark_impl or "auto", d_reference=self.d_reference, landmark_prefix=TEXT_TOKENS,
            exact_fp8=self.exact_fp8, **kw))

    def joint(self, config: KernelConfig | None = None, landmark_impl: str = "auto") -> Callable[[], torch.Tensor]:
        """One call of the joint layer (`combine = "shared"`) on these inputs: the text rows exact over every key,
        the image rows over the text keys, landmarks and window exactly plus the learned far field, one shared
        normaliser; α's logit and the log-scale at their initial values (0). Its plan is built at the first call."""
        heads, d = self.q.shape[1], self.q.shape[3]
        return self._planned_call(self.landmarks, self.window, lambda: JointServePlan(
            self.q, self.k, self.v, self.phi_q, self.phi_k, landmark_idx=self.landmarks,
            alpha_logit=torch.zeros(heads, device=self.q.device),
            log_scale_q=torch.zeros(heads, d, device=self.q.device), landmark_impl=landmark_impl, config=config,
            window=self.window, grid=self.grid, n_cond=TEXT_TOKENS, landmark_prefix=TEXT_TOKENS,
            exact_fp8=self.exact_fp8))

    def _planned_call(self, landmarks: torch.Tensor | None, window: int,
                      build: Callable[[], ServePlan]) -> Callable[[], torch.Tensor]:
        """A call that, the first time, checks that the fused path serves these inputs (with `landmarks` and
        `window`) and builds its plan with `build`; every call then runs that plan."""
        plans: list[ServePlan] = []

        def call() -> torch.Tensor:
            if not plans:
                reasons = fused_unsupported_reasons(self.q, self.k, self.v, self.phi_q, self.phi_k, None, landmarks,
                                                    window)
                if reasons:
                    raise RuntimeError("the fused path cannot serve this layer: " + "; ".join(reasons))
                plans.append(build())
            return plans[0](self.q, self.k, self.v)
        return call


def default_layer(size: str, device: torch.device, ttr: TtrSettings | None = None,
                  landmark: LandmarkSettings | None = None) -> LayerInputs:
    """Random bf16 inputs and the default layer (or the given settings) at `size` (e.g. "1024")."""
    ttr = ttr or TtrSettings()
    lm = landmark or LandmarkSettings()
    s = parse_shape(size, 24, 128, TEXT_TOKENS, 1)
    q, k, v = (torch.randn(1, 24, s.n, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    g = torch.Generator().manual_seed(0)
    phis = [random_phi(128, ttr.hidden_for(128), ttr.feature_dim, ttr.depth, ttr.activation, None, ttr.l2_norm,
                       generator=g, device=device) for _ in range(2)]
    assert s.grid is not None
    idx, _ = LandmarkBackend(lm).indices(k, _call(s))  # the landmark plugin's own selection, as a served call
    return LayerInputs(size, q, k, v, phis[0], phis[1], idx, lm.window, s.grid,
                       stand_in_reference(ttr, q.shape[1], device), exact_fp8=lm.precision == "fp8")
