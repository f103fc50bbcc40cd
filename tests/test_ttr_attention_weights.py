"""The ttr backend's implied attention rows (used by the distiller's attention KL / top-k metrics)."""
from __future__ import annotations

import pytest
import torch

from attnplug.core import AttentionCall, LayerSpec
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.settings import TtrSettings

CALL = AttentionCall("single:0", n_cond_tokens=4, n_image_tokens=60, sigma=None)


def _backend(landmark: bool) -> TtrBackend:
    settings = TtrSettings(feature_dim=32, hidden=32, adaptive_alpha=False, conditioner=False, alpha_init=0.5)
    backend = TtrBackend(settings, landmark=LandmarkBackend().branch if landmark else None)
    backend.layer(LayerSpec("single:0", 2, 16))
    return backend


@pytest.mark.parametrize("landmark", [False, True])
def test_weights_reproduce_the_layer_output(landmark):
    backend = _backend(landmark)
    q, k, v = (torch.randn(2, 2, 64, 16) for _ in range(3))
    w = backend.attention_weights("single:0", q, k, CALL)
    assert w.shape == (2, 2, 64, 64) and bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 64))
    # rows renormalised: output equals weights @ v up to the ε share of the Nadaraya–Watson denominator
    torch.testing.assert_close(w @ v, backend(q, k, v, CALL), atol=2e-4, rtol=1e-3)


def test_padded_keys_get_no_weight():
    backend = _backend(True)
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 64, 16)
    keep = torch.ones(1, 64, dtype=torch.bool)
    keep[0, 50:] = False
    w = backend.attention_weights("single:0", q, k, CALL, keep)
    assert float(w[..., 50:].abs().max()) == 0.0
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 8))
