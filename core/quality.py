"""Sample-level quality: what a quality term sees and the contract every term implements.

A *quality term* scores a candidate sample against the exact reference sample drawn from the same
prompt and noise (same host, same sampler, every attention call exact). Terms are the currency of
the controller: calibration keeps them within a budget, a learned policy is rewarded by them. Plugins
register terms through `attnplug_register_quality_terms`; the controller plugin ships the built-in
ones (latent and image RMSE / cosine, trajectory PSNR, velocity fidelity, LPIPS).

Every term reports one value per sample and says which direction is better. `budget_fraction` turns
a mean value and its bound into "share of the budget used" (1.0 = at the bound), the one scale on
which terms of different units are compared and summed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import torch

Direction = Literal["lower", "higher"]


@dataclass(frozen=True)
class Sample:
    """One batch of finished samples as a host hands them to quality terms.

    :param latent: the final latents `[B, ...]` in the host's own layout (float).
    :param image: decoded images `[B, C, H, W]` in [-1, 1], or None when the host does not decode.
    :param velocities: the model's prediction at every sampler step, each `[B, ...]`, or None.
    :param prompts: the host's record of the prompts (strings, the testbed's digit grids, ...).
    """

    latent: torch.Tensor
    image: torch.Tensor | None = None
    velocities: tuple[torch.Tensor, ...] | None = None
    prompts: Any = None

    @property
    def batch(self) -> int:
        return int(self.latent.shape[0])


@runtime_checkable
class QualityTerm(Protocol):
    """Scores candidate samples against exact references (same prompt, same noise).

    `needs` names the `Sample` fields the term reads (`"latent"`, `"image"`, `"velocities"`,
    `"prompts"`); a host that cannot provide one gets a clear error before any sampling.
    `score` returns one value per sample (`[B]`, float, on any device); `better` says whether lower
    or higher values mean closer to exact. Terms hold no per-call state and never modify inputs.
    """

    name: str
    better: Direction
    needs: frozenset[str]

    def score(self, candidate: Sample, reference: Sample) -> torch.Tensor: ...


class QualityError(ValueError):
    """A quality term cannot run (missing weights, a field the host does not provide, bad shapes)."""


def check_needs(term: QualityTerm, sample: Sample) -> None:
    """Raise a `QualityError` naming the term and field when `sample` lacks what `term` reads."""
    for field_name in sorted(term.needs):
        if field_name == "latent":
            continue
        if getattr(sample, field_name, None) is None:
            raise QualityError(f"quality term {term.name!r} needs the sample's {field_name!r}, which this host "
                               f"does not provide (choose another term, or a host that decodes/records it)")


def check_pair(term: QualityTerm, candidate: Sample, reference: Sample) -> None:
    """Both samples must carry the term's fields with the same batch and shapes."""
    check_needs(term, candidate)
    check_needs(term, reference)
    if candidate.batch != reference.batch:
        raise QualityError(f"quality term {term.name!r}: candidate has {candidate.batch} samples, reference "
                           f"{reference.batch}")
    for field_name in ("latent", "image"):
        a, b = getattr(candidate, field_name), getattr(reference, field_name)
        if a is not None and b is not None and a.shape != b.shape:
            raise QualityError(f"quality term {term.name!r}: candidate {field_name} {tuple(a.shape)} does not match "
                               f"reference {tuple(b.shape)}")


def budget_fraction(term: QualityTerm, value: float, bound: float) -> float:
    """How much of a term's budget a mean `value` uses: 0 at exact, 1.0 at `bound`, > 1 beyond it.

    Lower-is-better terms (distances, exact = 0): `value / bound`. Higher-is-better terms are
    decibels (PSNR, exact = ∞): the ratio of the mean squared errors they stand for,
    `10 ** ((bound - value) / 10)`. Non-finite values count as far beyond the budget.
    """
    if term.better == "higher":
        if value == math.inf:
            return 0.0
        return 10.0 ** ((bound - value) / 10.0) if math.isfinite(value) else math.inf
    if not math.isfinite(value):
        return math.inf
    return max(value, 0.0) / bound if bound > 0 else (0.0 if value <= 0 else math.inf)


def within(term: QualityTerm, value: float, bound: float) -> bool:
    """True when a mean `value` satisfies `bound` in the term's direction (NaN never does)."""
    if math.isnan(value):
        return False
    return value <= bound if term.better == "lower" else value >= bound


def mean_scores(terms: Sequence[QualityTerm], candidate: Sample, reference: Sample) -> dict[str, float]:
    """Mean value of every term over the batch, `{term name: value}` (each pair checked first)."""
    out: dict[str, float] = {}
    for term in terms:
        check_pair(term, candidate, reference)
        values = term.score(candidate, reference)
        if values.ndim != 1 or values.shape[0] != candidate.batch:
            raise QualityError(f"quality term {term.name!r} returned shape {tuple(values.shape)}, expected "
                               f"[{candidate.batch}] (one value per sample)")
        out[term.name] = float(values.float().mean())
    return out
