"""Stand-in of `comfy/sample.py`: `prepare_noise` as upstream, and `sample` through the stand-in's CFGGuider.

Upstream's `sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, ...)`
builds a KSampler from the names; here every sampler is the stand-in's Euler loop on flux sigmas, and
`positive` / `negative` are the stand-in's cond tensors. The returned latent is the final sample, as upstream.
"""
from __future__ import annotations

from typing import Any

import torch

import comfy.samplers


def prepare_noise(latent_image: torch.Tensor, seed: int, noise_inds: Any = None) -> torch.Tensor:
    generator = torch.manual_seed(seed)
    return torch.randn(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout,
                       generator=generator, device="cpu")


def sample(model: Any, noise: torch.Tensor, steps: int, cfg: float, sampler_name: str, scheduler: str,
           positive: Any, negative: Any, latent_image: torch.Tensor, denoise: float = 1.0,
           disable_noise: bool = False, start_step: Any = None, last_step: Any = None,
           force_full_denoise: bool = False, noise_mask: Any = None, sigmas: Any = None, callback: Any = None,
           disable_pbar: bool = False, seed: Any = None) -> torch.Tensor:
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS or scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise ValueError(f"unknown sampler {sampler_name!r} or scheduler {scheduler!r}")
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider.sample(noise, sigmas if sigmas is not None else comfy.samplers.flux_sigmas(steps), callback)
