"""The controller on a diffusers pipeline: routing-policy episodes and `attnplug controller train --pipeline`.

Serving a policy is `apply(pipe, config, policy=..., policy_threshold=...)` (apply.py). Training samples
episodes through the patched pipeline: episode `key` is prompt `key mod n` with seed `seed + key`
(`PipelineSampler`'s recording of latents, images and per-step predictions), so each (prompt, noise) has
one exact reference, cached by the trainer. The pipeline's pooled prompt embedding (Flux: CLIP's
`pooled_projections`) reaches the session through the transformer hook and is the policy's text feature.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ...core.quality import Sample
from .calibration import PipelineSampler, load_pipeline, read_prompts


class PipelineEpisodes:
    """`sample(key)`: prompt `key mod len(prompts)` from the seed `seed + key`, through the patched pipeline."""

    def __init__(self, pipe: Any, session: Any, prompts: Sequence[str], *, seed: int = 0, steps: int = 20,
                 height: int = 1024, width: int = 1024) -> None:
        self.sampler = PipelineSampler(pipe, session, prompts, seed=seed, steps=steps, height=height, width=width)

    def sample(self, key: int) -> Sample:
        prompts = self.sampler.prompts
        prompt = prompts[key % len(prompts)]
        predictions: list[torch.Tensor] = []
        latent, image = self.sampler._one(key, prompt, predictions)
        return Sample(latent=latent, image=image, velocities=tuple(predictions), prompts=[prompt])

    def close(self) -> None:
        self.sampler.close()


def train_pipeline_policy(pipeline: str | Any, config: Any, checkpoint: str | Path, *, policy_out: str | Path,
                          prompts_file: str | Path | None, steps: int = 20, device: str = "cuda",
                          dtype: str = "bfloat16", height: int = 1024, width: int = 1024,
                          minutes: float | None = None, updates: int | None = None, resume: str | Path | None = None,
                          use_text: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """`attnplug controller train --pipeline`: episodes of `prompts_file` through the pipeline (a local folder or a
    cached hub id; nothing is downloaded)."""
    from ...plugins.controller.train_policy import PolicyTrainingError, run_policy_training

    if prompts_file is None:
        raise PolicyTrainingError("training on a pipeline needs --prompts-file (a JSON list of prompt strings)")
    prompts = read_prompts(prompts_file)
    pipe = load_pipeline(pipeline, dtype, device)

    def make_sampler(session: Any, settings: Any) -> PipelineEpisodes:
        return PipelineEpisodes(pipe, session, prompts, seed=settings.seed, steps=steps, height=height, width=width)

    return run_policy_training(config, checkpoint, make_sampler, policy_out=policy_out, minutes=minutes,
                               updates=updates, resume=resume, use_text=use_text, progress=progress)
