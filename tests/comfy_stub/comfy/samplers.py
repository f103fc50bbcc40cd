"""Stand-in of `comfy/samplers.py`: `CFGGuider` and the per-step path down to the model.

Upstream call path kept (names as upstream):
`CFGGuider.sample`: merge the
patcher's wrappers/callbacks into `model_options["transformer_options"]` (as
`sampler_helpers.prepare_model_patcher`) → OUTER_SAMPLE wrappers (`class_obj` = the guider) →
`outer_sample`: `model_patcher.pre_run()`, `inner_sample` (adds
`transformer_options["sample_sigmas"]`), `finally: model_patcher.cleanup()` →
`predict_noise` → `sampling_function` (cfg 1 skips the uncond pass) → `_calc_cond_batch`, which
merges `model_options["transformer_options"]` and sets `cond_or_uncond`, `uuids` and
`sigmas = timestep` for one batched cond+uncond call. The sampler is plain Euler.
Left out: hooks, areas, masks, controlnets, multi-GPU.
"""
from __future__ import annotations

import uuid
from typing import Any

import torch

import comfy.model_patcher
import comfy.patcher_extension
from comfy.patcher_extension import WrapperExecutor, WrappersMP


def _calc_cond_batch(model: Any, conds: list[torch.Tensor | None], x_in: torch.Tensor, timestep: torch.Tensor,
                     model_options: dict) -> list[torch.Tensor | None]:
    cond_or_uncond = [i for i, c in enumerate(conds) if c is not None]
    input_x = torch.cat([x_in] * len(cond_or_uncond))
    context = torch.cat([conds[i] for i in cond_or_uncond])
    timestep_ = torch.cat([timestep] * len(cond_or_uncond))
    transformer_options: dict = {}
    if "transformer_options" in model_options:
        transformer_options = comfy.patcher_extension.merge_nested_dicts(transformer_options,
                                                                         model_options["transformer_options"],
                                                                         copy_dict1=False)
    transformer_options["cond_or_uncond"] = cond_or_uncond[:]
    transformer_options["uuids"] = [uuid.uuid4() for _ in cond_or_uncond]
    transformer_options["sigmas"] = timestep
    out = model.apply_model(input_x, timestep_, c_crossattn=context, transformer_options=transformer_options)
    chunks = out.chunk(len(cond_or_uncond))
    result: list[torch.Tensor | None] = [None, None]
    for i, c in zip(cond_or_uncond, chunks):
        result[i] = c
    return result


def sampling_function(model: Any, x: torch.Tensor, timestep: torch.Tensor, uncond: torch.Tensor | None,
                      cond: torch.Tensor, cond_scale: float, model_options: dict = {}) -> torch.Tensor:  # noqa: B006
    if abs(cond_scale - 1.0) < 1e-9:
        uncond = None
    cond_pred, uncond_pred = _calc_cond_batch(model, [cond, uncond], x, timestep, model_options)
    if uncond_pred is None:
        return cond_pred
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


class CFGGuider:
    def __init__(self, model_patcher: comfy.model_patcher.ModelPatcher) -> None:
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.cfg = 1.0
        self.conds: dict[str, torch.Tensor] = {}

    def set_conds(self, positive: torch.Tensor, negative: torch.Tensor) -> None:
        self.conds = {"positive": positive, "negative": negative}

    def set_cfg(self, cfg: float) -> None:
        self.cfg = cfg

    def predict_noise(self, x: torch.Tensor, timestep: torch.Tensor, model_options: dict = {}) -> torch.Tensor:  # noqa: B006
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"), self.conds["positive"],
                                 self.cfg, model_options=model_options)

    def inner_sample(self, noise: torch.Tensor, sigmas: torch.Tensor, callback: Any = None) -> torch.Tensor:
        extra_model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
        extra_model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            s = sigmas[i] * torch.ones(x.shape[0])
            denoised = self.predict_noise(x, s, model_options=extra_model_options)
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
            if callback is not None:
                callback(i, denoised, x, len(sigmas) - 1)
        return x

    def outer_sample(self, noise: torch.Tensor, sigmas: torch.Tensor, callback: Any = None) -> torch.Tensor:
        self.inner_model = self.model_patcher.model
        try:
            self.model_patcher.pre_run()
            return self.inner_sample(noise, sigmas, callback)
        finally:
            self.model_patcher.cleanup()

    def sample(self, noise: torch.Tensor, sigmas: torch.Tensor, callback: Any = None) -> torch.Tensor:
        orig = self.model_options
        self.model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
        try:
            # sampler_helpers.prepare_model_patcher: the patcher's wrappers/callbacks join transformer_options
            to = self.model_options.setdefault("transformer_options", {})
            comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), self.model_patcher.wrappers,
                                                       copy_dict1=False)
            comfy.patcher_extension.merge_nested_dicts(to.setdefault("callbacks", {}), self.model_patcher.callbacks,
                                                       copy_dict1=False)
            executor = WrapperExecutor.new_class_executor(
                self.outer_sample, self,
                comfy.patcher_extension.get_all_wrappers(WrappersMP.OUTER_SAMPLE, self.model_options,
                                                         is_model_options=True))
            return executor.execute(noise, sigmas, callback)
        finally:
            self.model_options = orig


def flux_sigmas(steps: int) -> torch.Tensor:
    """A simple descending flow-matching schedule 1 → 0 with `steps` steps (`steps + 1` values)."""
    return torch.linspace(1.0, 0.0, steps + 1)


class KSampler:
    """Upstream's sampler and scheduler name lists (a subset), which KSampler-like nodes offer as combos."""

    SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m"]
    SCHEDULERS = ["simple", "normal", "beta"]
