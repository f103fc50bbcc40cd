"""Calibrate a serving plan on the testbed: its sampler, its adherence term, and the one-call driver.

The calibration prompts are training-distribution prompts (never the held-out ones the evaluation
uses), sampled with fixed noise through attnplug's diffusers host; the testbed's digit classifier
gives a testbed-only quality term, `testbed_adherence`: adherence points lost against the exact
sample of the same prompt and noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..core.quality import Direction, Sample
from . import classifier, data, sampling
from .model import load_testbed

CALIBRATION_CONFIG = Path(__file__).parent / "configs" / "calibrate.toml"
_PROMPT_STREAM = 4321  # generator seed offset of the calibration prompts (distinct from training and held-out)


@dataclass
class TestbedAdherence:
    """Adherence points lost against the exact sample (digit classifier of the testbed, per prompt)."""

    __test__ = False
    name: str = "testbed_adherence"
    better: Direction = "lower"
    needs: frozenset[str] = field(default_factory=lambda: frozenset({"image", "prompts"}))

    def score(self, candidate: Sample, reference: Sample) -> torch.Tensor:
        assert candidate.image is not None and reference.image is not None
        cand = classifier.adherence_per_prompt(candidate.image, candidate.prompts)
        ref = classifier.adherence_per_prompt(reference.image, reference.prompts)
        return 100.0 * (ref - cand)


class TestbedSampler:
    """Samples `n` calibration prompts from fixed noise through a session (diffusers host on the testbed)."""

    __test__ = False

    def __init__(self, session: Any, n_prompts: int, seed: int = 0, steps: int = 20, device: str = "cpu",
                 batch_size: int = 32, weights: str | Path | None = None, testbed: str | None = None) -> None:
        from ..hosts.diffusers import apply

        self.model = load_testbed(device, path=weights, testbed=testbed)
        self.prompts = data.train_prompts(n_prompts, self.model.cfg.grid,
                                          generator=torch.Generator().manual_seed(seed + _PROMPT_STREAM))
        self.noise = sampling.initial_noise(n_prompts, self.prompts.shape[1], seed=seed + _PROMPT_STREAM)
        self.steps, self.batch_size = steps, batch_size
        self.handle = apply(self.model.transformer, session)

    def sample(self) -> Sample:
        return sample_testbed(self.model, self.prompts, self.noise, self.steps, self.batch_size)

    def close(self) -> None:
        self.handle.remove()


def sample_testbed(model: Any, prompts: torch.Tensor, noise: torch.Tensor, steps: int, batch_size: int) -> Sample:
    """Sample `prompts` from `noise` (each chunk of `batch_size` one sampling run) with every step's velocity."""
    images, velocities = [], []
    for i in range(0, prompts.shape[0], batch_size):
        recorder = _VelocityRecorder(model)
        images.append(sampling.sample(recorder, prompts[i:i + batch_size], noise[i:i + batch_size], steps=steps))
        velocities.append(recorder.velocities)
    image = torch.cat(images)
    per_step = tuple(torch.cat([chunk[s] for chunk in velocities]) for s in range(steps))
    return Sample(latent=data.pack(image), image=image, velocities=per_step, prompts=prompts)


class _VelocityRecorder:
    """Wraps the testbed model and keeps each step's predicted velocity (on the CPU, float32)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.velocities: list[torch.Tensor] = []

    def velocity(self, x_t: torch.Tensor, sigma: float, prompts: torch.Tensor) -> torch.Tensor:
        v = self.model.velocity(x_t, sigma, prompts)
        self.velocities.append(v.detach().float().cpu())
        return v

    def parameters(self) -> Any:
        return self.model.parameters()


def calibrate_testbed(config: "str | Path | Mapping[str, Any]", checkpoint: str | Path, *, out: str | Path,
                      device: str = "cpu", steps: int = 20, prompts: int | None = None,
                      write_checkpoint: bool = True, plan_out: str | Path | None = None,
                      weights: str | Path | None = None, progress: bool = True,
                      testbed: str | None = None) -> dict[str, Any]:
    """`attnplug calibrate` on the testbed: the plan of `checkpoint` under `config`, with the testbed's
    adherence term available; reports in `out`, the plan stored in the checkpoint. Returns the report.
    `testbed`: the registry's testbed to sample (None: the default)."""
    from ..plugins.controller.calibrate import run_calibration

    def make_sampler(session: Any, settings: Any) -> TestbedSampler:
        return TestbedSampler(session, settings.prompts, seed=settings.seed, steps=steps, device=device,
                              weights=weights, testbed=testbed)

    return run_calibration(config, checkpoint, make_sampler, out=out, prompts=prompts,
                           write_checkpoint=write_checkpoint, plan_out=plan_out,
                           extra_terms={"testbed_adherence": _adherence_factory}, progress=progress)


def _adherence_factory(settings: Any, context: Any) -> TestbedAdherence:
    return TestbedAdherence()
