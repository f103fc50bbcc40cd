"""Calibration inside ComfyUI: sample the same latent noise repeatedly through a bound model.

`ComfySampler` runs `comfy.sample.sample` (what KSampler runs) with seeds `seed + i` for each
calibration sample, on one conditioning pair, and decodes with the VAE when one is given, so the
latent, image and LPIPS terms can score it. The binding keeps one session across these runs
(`SessionSpec.keep_session`) so the calibration can steer its plan gate between them.
ComfyUI is imported lazily.
"""
from __future__ import annotations

from typing import Any

import torch

from ...core.quality import Sample


class ComfySampler:
    """`n` samples of `positive`/`negative` from seeded noise on `latent`, through the patched `model`."""

    def __init__(self, model: Any, positive: Any, negative: Any, latent: dict[str, Any], vae: Any, *, n: int,
                 seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str) -> None:
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim < 4:
            raise ValueError("attnplug Calibrate node: `latent` must be a LATENT (e.g. from Empty Latent Image)")
        self.model, self.positive, self.negative, self.vae = model, positive, negative, vae
        self.latent = samples[:1]
        self.n, self.seed, self.steps, self.cfg = n, seed, steps, cfg
        self.sampler_name, self.scheduler = sampler_name, scheduler

    def sample(self) -> Sample:
        parts = [self.sample_seed(self.seed + i) for i in range(self.n)]
        images = [p.image for p in parts if p.image is not None]
        return Sample(latent=torch.cat([p.latent for p in parts]), image=torch.cat(images) if images else None)

    def sample_seed(self, seed: int) -> Sample:
        """One sample from the noise of `seed` (decoded when a VAE is given)."""
        import comfy.sample

        noise = comfy.sample.prepare_noise(self.latent, seed)
        out = comfy.sample.sample(self.model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                  self.positive, self.negative, self.latent, seed=seed, disable_pbar=True)
        image = None
        if self.vae is not None:
            image = self.vae.decode(out).movedim(-1, 1).float().cpu() * 2 - 1  # [B, H, W, C] in [0, 1] → [-1, 1]
        return Sample(latent=out.detach().float().cpu(), image=image)


class ComfyEpisodes:
    """Routing-policy episodes in ComfyUI: episode `key` is the sampler's conditioning from the noise of `seed + key`."""

    def __init__(self, sampler: ComfySampler) -> None:
        self.sampler = sampler

    def sample(self, key: int) -> Sample:
        return self.sampler.sample_seed(self.sampler.seed + key)
