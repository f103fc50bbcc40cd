"""Built-in quality terms: distances between a candidate sample and the exact sample of the same noise.

Each term is one small class satisfying `attnplug.core.quality.QualityTerm`; all values are per sample
(`[B]`). Distances are 0 for identical samples; `trajectory_psnr` is in decibels (higher is better).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...core.quality import Direction, QualityError, Sample


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().flatten(1)


def relative_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a − b|| / ||b|| per sample [B] (scale-free, so one bound fits any latent space)."""
    x, y = _flat(a), _flat(b.to(a.device))
    return (x - y).norm(dim=1) / y.norm(dim=1).clamp_min(1e-12)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 − cosine similarity of the flattened per-sample tensors [B]."""
    return 1.0 - F.cosine_similarity(_flat(a), _flat(b.to(a.device)), dim=1)


def psnr_db(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR [B] of images in [-1, 1] (both clipped; identical images give +inf)."""
    x, y = _flat(a).clamp(-1, 1), _flat(b.to(a.device)).clamp(-1, 1)
    mse = (x - y).pow(2).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


@dataclass
class LatentRmse:
    """Relative RMSE of the final latents, ||c − r|| / ||r||."""

    name: str = "latent_rmse"
    better: Direction = "lower"
    needs: frozenset[str] = field(default_factory=lambda: frozenset({"latent"}))

    def score(self, candidate: Sample, reference: Sample) -> torch.Tensor:
        return relative_rmse(candidate.latent, reference.latent)


@dataclass
class LatentCosine:
    """Cosine distance of the final latents (direction only, insensitive to scale)."""

    name: str = "latent_cosine"
    better: Direction = "lower"
    needs: frozenset[str] = field(default_factory=lambda: frozenset({"latent"}))

    def score(self, candidate: Sample, reference: Sample) -> torch.Tensor:
        return cosine_distance(candidate.latent, reference.latent)


@dataclass
class ImageRmse:
    """RMSE of the decoded images in [-1, 1]."""

    name: str = "image_rmse"
    better: Direction = "lower"
    needs: frozenset[str] = field(default_factory=lambda: frozenset({"image"}))

    def score(self, candidate: Sample, reference: Sample) -> torch.Tensor:
        assert candidate.image is not None and reference.image is not None
        return (_flat(candidate.image) - _flat(reference.image.to(candidate.image.device))).pow(2).mean(1).sqrt()


@dataclass
class ImageCosine:
    """Cosine distance of the decoded images."""

    name: str = "image_cosine"
    better: Direction = "lower"
    needs: frozenset[str] = field(default_factory=lambda: frozenset({"image"}))

    def score(self, candidate: Sample, reference: Sample) -> torch.Tensor:
        assert candidate.image is not None and reference.image is not None
        return cosine_distance(candidate.image, reference.image)


@dataclass
class TrajectoryPsnr:
    """PSNR (dB) of the decoded candidate against the exact sample of the same noise.

    It includes trajectory divergence: a sampler that draws another instance of the same content scores
    low, so bound it loosely and pair it with a term that looks at content (LPIPS, adherence)."""

    name: str = "trajectory_psnr"
    better: Direction = "higher"
    needs: frozenset[str] = field(default_factory=lambda: frozenset({"image"}))

    def score(self, candidate: Sample, reference: Sample) -> torch.Tensor:
        assert candidate.image is not None and reference.image is not None
        return psnr_db(candidate.image, reference.image)


@dataclass
class VelocityFidelity:
    """1 − mean cosine of the per-step model predictions of candidate and reference (each on its own
    trajectory, same noise): how far each step's velocity strays, averaged over the steps."""

    name: str = "velocity_fidelity"
    better: Direction = "lower"
    needs: frozenset[str] = field(default_factory=lambda: frozenset({"velocities"}))

    def score(self, candidate: Sample, reference: Sample) -> torch.Tensor:
        assert candidate.velocities is not None and reference.velocities is not None
        if len(candidate.velocities) != len(reference.velocities) or not candidate.velocities:
            raise QualityError(f"quality term {self.name!r}: candidate has {len(candidate.velocities)} steps, "
                               f"reference {len(reference.velocities)} (both must be sampled alike, >= 1 step)")
        per_step = torch.stack([cosine_distance(c, r) for c, r in zip(candidate.velocities, reference.velocities)])
        return per_step.mean(0)


#: name → class of the built-in terms without settings (LPIPS has its own module and settings).
BUILTIN_TERMS: dict[str, type] = {cls().name: cls for cls in (LatentRmse, LatentCosine, ImageRmse, ImageCosine,
                                                             TrajectoryPsnr, VelocityFidelity)}
