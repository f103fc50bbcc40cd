"""`AttentionCall` from ComfyUI's `transformer_options` — never guessed.

Sources (ComfyUI's Flux code: `comfy/ldm/flux/model.py`, `layers.py`, and the samplers):
- layer: `block_type` / `block_index` (Flux `forward_orig`, ComfyUI ≥ 2025-11-26). Missing → the
  call is not identified and the binding serves it with exact attention (fail-closed).
- conditioning-token count: single blocks read `transformer_options["img_slice"][0]`; double
  blocks get it from `extra_options["img_slice"]`, captured by an `attn1_patch` right before the
  attention call of the same block; builds without `img_slice` fall back to `context.shape[1]`
  captured by a `DIFFUSION_MODEL` wrapper. None of them → exact attention.
- sigma: `transformer_options["sigmas"]` (one `.item()` per model forward, cached by tensor identity);
  step index and count: the position of sigma in `transformer_options["sample_sigmas"]`.
- cond/uncond: `cond_or_uncond` (0 = cond, 1 = uncond; mixed batch → None); cfg: the guider's `cfg`
  captured by an `OUTER_SAMPLE` wrapper.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...core import AttentionCall


@dataclass
class Capture:
    """What the attn1_patch saw for one block: its identity and the txt/img split."""

    block: tuple[Any, Any]
    n_cond: int
    n_total: int


class CallState(threading.local):
    """Per-thread state of one binding (ComfyUI may run model forwards on worker threads)."""

    def __init__(self) -> None:
        self.capture: Capture | None = None
        self.context_len: int | None = None
        self.latent_grid: tuple[int, int] | None = None
        self.sigmas_obj: Any = None
        self.sigma: float | None = None
        self.sample_sigmas_obj: Any = None
        self.sample_sigmas: list[float] | None = None
        self.inside = False  # inside attnplug's override on this thread (calls back into it pass through)

    def clear(self) -> None:
        """Drop every tensor reference (called at cleanup)."""
        self.__init__()  # type: ignore[misc]


def step_of(sigma: float, schedule: list[float]) -> int:
    """Index of the sampler step whose interval [s_i, s_{i+1}) holds `sigma` (sub-steps map to their step)."""
    tol = 1e-5 * max(1.0, abs(sigma))
    best = 0
    for i, s in enumerate(schedule[:-1]):
        if s + tol >= sigma:
            best = i
        else:
            break
    return best


class CallBuilder:
    """Builds the `AttentionCall` of one ComfyUI attention call from `transformer_options`."""

    def __init__(self, state: CallState) -> None:
        self.state = state
        self.cfg: float | None = None

    def sigma_step(self, to: Mapping[str, Any]) -> tuple[float | None, int | None, int | None]:
        st = self.state
        sigmas = to.get("sigmas")
        if sigmas is None:
            return None, None, None
        if sigmas is not st.sigmas_obj:
            st.sigmas_obj = sigmas
            st.sigma = float(sigmas.reshape(-1)[0]) if isinstance(sigmas, torch.Tensor) else float(sigmas)
        sample = to.get("sample_sigmas")
        if sample is None:
            return st.sigma, None, None
        if sample is not st.sample_sigmas_obj:
            st.sample_sigmas_obj = sample
            st.sample_sigmas = [float(x) for x in (sample.detach().float().cpu().reshape(-1)
                                                    if isinstance(sample, torch.Tensor) else sample)]
        sched = st.sample_sigmas or []
        if len(sched) < 2 or st.sigma is None:
            return st.sigma, None, None
        return st.sigma, step_of(st.sigma, sched), len(sched) - 1

    def cond_tokens(self, to: Mapping[str, Any], block: tuple[Any, Any], n: int) -> int | None:
        """Conditioning tokens at the front of the sequence, from the host's own split; None if unknown."""
        if block[0] == "single":
            sl = to.get("img_slice")
            if sl is not None and len(sl) == 2 and int(sl[1]) == n:
                return int(sl[0])
        cap = self.state.capture
        if cap is not None and cap.block == block and cap.n_total == n:
            return cap.n_cond
        ctx = self.state.context_len
        if ctx is not None and 0 <= ctx <= n:
            return ctx
        return None

    def build(self, to: Mapping[str, Any], n: int) -> AttentionCall | None | str:
        """The call record; `"no-block"` when the build has no block info; None when the split is unknown."""
        bt, bi = to.get("block_type"), to.get("block_index")
        if bt is None or bi is None:
            return "no-block"
        n_cond = self.cond_tokens(to, (bt, bi), n)
        if n_cond is None:
            return None
        sigma, step, num_steps = self.sigma_step(to)
        cu = to.get("cond_or_uncond")
        cond = None
        if cu:
            if all(c == 0 for c in cu):
                cond = True
            elif all(c == 1 for c in cu):
                cond = False
        n_img = n - n_cond
        # the generated latent's grid, also when the image tokens are more (reference-image tokens of a
        # Kontext-style edit): the landmark plugin then says so and uses the landmarks only
        grid = self.state.latent_grid
        return AttentionCall(layer_key=f"{bt}:{bi}", block_type=bt if bt in ("double", "single") else "other",
                             block_index=int(bi), sigma=sigma, step_index=step, num_steps=num_steps, cond=cond,
                             cfg_scale=self.cfg, n_cond_tokens=n_cond, n_image_tokens=n_img, latent_grid=grid,
                             host="comfy")
