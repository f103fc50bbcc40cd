"""Quality terms: what each built-in term measures, its direction, budget shares, and clear errors."""
from __future__ import annotations

import math

import pytest
import torch

from attnplug.core.quality import QualityError, Sample, budget_fraction, check_pair, mean_scores, within
from attnplug.plugins.controller.terms import (BUILTIN_TERMS, ImageCosine, ImageRmse, LatentCosine, LatentRmse,
                                               TrajectoryPsnr, VelocityFidelity)


def _sample(latent: torch.Tensor, image: torch.Tensor | None = None, velocities=None) -> Sample:
    return Sample(latent=latent, image=image, velocities=velocities)


def test_identical_samples_score_exact_on_every_term():
    x = torch.randn(3, 16, 4)
    img = torch.rand(3, 1, 8, 8) * 2 - 1
    vel = tuple(torch.randn(3, 16, 4) for _ in range(5))
    s = Sample(x, img, vel)
    for cls in BUILTIN_TERMS.values():
        term = cls()
        values = term.score(s, s)
        assert values.shape == (3,)
        if term.better == "lower":
            assert torch.allclose(values, torch.zeros(3), atol=1e-6), term.name
        else:
            assert torch.isinf(values).all() and (values > 0).all(), term.name


def test_latent_rmse_is_relative_and_cosine_ignores_scale():
    ref = torch.ones(2, 10)
    cand = ref.clone()
    cand[0, 0] += 1.0  # ||Δ|| = 1, ||ref|| = √10
    rmse = LatentRmse().score(_sample(cand), _sample(ref))
    assert rmse[0] == pytest.approx(1 / math.sqrt(10), rel=1e-5) and rmse[1] == 0
    assert LatentCosine().score(_sample(3 * ref), _sample(ref)).abs().max() < 1e-6  # direction only
    assert LatentCosine().score(_sample(-ref), _sample(ref))[0] == pytest.approx(2.0)


def test_image_terms_and_psnr_on_known_differences():
    ref = torch.zeros(1, 1, 4, 4)
    cand = torch.full((1, 1, 4, 4), 0.2)
    assert ImageRmse().score(_sample(cand, cand), _sample(ref, ref))[0] == pytest.approx(0.2, rel=1e-5)
    # PSNR with data range 2: 10 log10(4 / 0.04) = 20 dB
    assert TrajectoryPsnr().score(_sample(cand, cand), _sample(ref, ref))[0] == pytest.approx(20.0, rel=1e-5)
    assert ImageCosine().score(_sample(cand, cand + 1), _sample(ref, cand + 1))[0] == pytest.approx(0.0, abs=1e-6)


def test_velocity_fidelity_averages_per_step_cosine_distance():
    ref = tuple(torch.ones(2, 4) for _ in range(4))
    cand = list(ref)
    cand[1] = -torch.ones(2, 4)  # one step in the opposite direction: distance 2 on that step
    v = VelocityFidelity().score(_sample(torch.ones(2, 4), velocities=tuple(cand)),
                                 _sample(torch.ones(2, 4), velocities=ref))
    assert torch.allclose(v, torch.full((2,), 0.5))
    with pytest.raises(QualityError, match="steps"):
        VelocityFidelity().score(_sample(torch.ones(2, 4), velocities=ref[:2]), _sample(torch.ones(2, 4), velocities=ref))


def test_missing_fields_and_mismatched_batches_are_named():
    term = ImageRmse()
    with pytest.raises(QualityError, match="image_rmse.*'image'"):
        check_pair(term, _sample(torch.ones(2, 3)), _sample(torch.ones(2, 3)))
    with pytest.raises(QualityError, match="3 samples, reference 2"):
        mean_scores([LatentRmse()], _sample(torch.ones(3, 3)), _sample(torch.ones(2, 3)))


def test_budget_fraction_is_one_at_the_bound_in_both_directions():
    lower, higher = LatentRmse(), TrajectoryPsnr()
    assert budget_fraction(lower, 0.05, 0.1) == pytest.approx(0.5)
    assert budget_fraction(lower, 0.1, 0.1) == pytest.approx(1.0)
    assert budget_fraction(higher, 30.0, 30.0) == pytest.approx(1.0)
    assert budget_fraction(higher, 33.0, 30.0) == pytest.approx(10 ** -0.3)  # half the MSE of the bound
    assert budget_fraction(higher, math.inf, 30.0) == 0.0
    assert budget_fraction(lower, math.nan, 0.1) == math.inf
    assert within(lower, 0.1, 0.1) and not within(lower, 0.11, 0.1) and not within(lower, math.nan, 1.0)
    assert within(higher, 31.0, 30.0) and not within(higher, 29.0, 30.0)


def test_lpips_random_weights_score_and_missing_backbone_error(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    pytest.importorskip("lpips")
    from attnplug.plugins.controller.lpips_term import LpipsSettings, LpipsTerm, backbone_file, build_lpips

    term = LpipsTerm(LpipsSettings(random_weights=True))
    a = torch.rand(2, 1, 64, 64) * 2 - 1
    b = torch.rand(2, 1, 64, 64) * 2 - 1
    same = term.score(_sample(a, a), _sample(a, a))
    diff = term.score(_sample(a, a), _sample(b, b))
    assert same.shape == (2,) and torch.allclose(same, torch.zeros(2), atol=1e-6)
    assert (diff > same).all()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, url = backbone_file("alex")
    assert str(path).startswith(str(tmp_path)) and url.endswith(path.name)
    with pytest.raises(QualityError, match=str(path.name)):
        build_lpips(LpipsSettings(net="alex"))
