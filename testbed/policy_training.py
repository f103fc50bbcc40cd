"""Routing-policy episodes on the testbed: training-distribution prompts and noise per episode key.

Episode `key` holds `prompts_per_episode` training prompts (never held-out ones) and their noise, both drawn
from generators seeded by (seed, key), so the exact reference of a key is the same sample every time and is
cached by the trainer. The testbed's pooled prompt vector reaches the session through the diffusers host
(`pooled_projections`), which gives the policy its text feature.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..core.quality import Sample
from . import data, sampling
from .calibration import _adherence_factory, sample_testbed
from .model import load_testbed

_EPISODE_STREAM = 8191  # generator seed offset of training episodes (distinct from calibration and held-out)


class TestbedEpisodes:
    """`sample(key)`: episode `key`'s prompts sampled from its noise through `session` (diffusers host)."""

    __test__ = False

    def __init__(self, session: Any, prompts_per_episode: int, seed: int = 0, steps: int = 20, device: str = "cpu",
                 weights: str | Path | None = None, model: Any = None) -> None:
        from ..hosts.diffusers import apply

        self.n, self.seed, self.steps = prompts_per_episode, seed, steps
        if model is None:  # a model of its own, patched here (a given model is patched by the caller)
            self.model = load_testbed(device, path=weights)
            self.handle = apply(self.model.transformer, session)
        else:
            self.model, self.handle = model, None

    def inputs(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts [n, G, G] and noise of episode `key`."""
        stream = (self.seed * 1_000_003 + key) * 2 + _EPISODE_STREAM
        prompts = data.train_prompts(self.n, grid=self.model.cfg.grid, generator=torch.Generator().manual_seed(stream))
        return prompts, sampling.initial_noise(self.n, self.model.cfg.grid, seed=stream + 1)

    def sample(self, key: int) -> Sample:
        prompts, noise = self.inputs(key)
        return sample_testbed(self.model, prompts, noise, self.steps, self.n)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def train_testbed_policy(config: "str | Path | Mapping[str, Any]", checkpoint: str | Path, *, policy_out: str | Path,
                         device: str = "cpu", steps: int = 20, minutes: float | None = None,
                         updates: int | None = None, resume: str | Path | None = None, use_text: bool | None = None,
                         weights: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """`attnplug controller train` on the testbed (the testbed's adherence term available as a reward term)."""
    from ..plugins.controller.train_policy import run_policy_training

    def make_sampler(session: Any, settings: Any) -> TestbedEpisodes:
        return TestbedEpisodes(session, settings.prompts_per_episode, seed=settings.seed, steps=steps, device=device,
                               weights=weights)

    return run_policy_training(config, checkpoint, make_sampler, policy_out=policy_out, minutes=minutes,
                               updates=updates, resume=resume, use_text=use_text,
                               extra_terms={"testbed_adherence": _adherence_factory}, progress=progress)
