"""The landmark backend: exact softmax against the landmarks, masks, dtypes, registration."""
from __future__ import annotations

import pytest
import torch

from attnplug.core import AttentionCall, Plugins, Session
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.landmark.settings import LandmarkSettings


def _plugins() -> Plugins:
    return Plugins(builtins={"core": "attnplug.core.builtin", "landmark": "attnplug.plugins.landmark.plugin"},
                   load_entry_points=False)


def _naive(q, k, v, idx_rows, scale):
    out = torch.empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        sel = idx_rows[b]
        logits = q[b].double() @ k[b][:, sel].double().transpose(-1, -2) * scale
        out[b] = torch.softmax(logits, -1) @ v[b][:, sel].double()
    return out


def test_matches_naive_softmax_over_selected_keys() -> None:
    b, h, n_cond, n_img, d = 2, 3, 5, 300, 16
    q, k, v = (torch.randn(b, h, n_cond + n_img, d) for _ in range(3))
    call = AttentionCall("single:0", n_cond_tokens=n_cond, n_image_tokens=n_img)
    # pinned: at least 64 image landmarks (more than 8 % of 300), no window (the reference is landmarks-only)
    backend = LandmarkBackend(LandmarkSettings(fraction=0.08, min=64, window=0, query_chunk=37))
    out = backend(q, k, v, call)
    idx, _ = backend.indices(k, call)
    assert idx.numel() == n_cond + 64
    ref = _naive(q, k, v, [idx, idx], d ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_key_padding_mask_is_respected() -> None:
    b, h, n, d = 2, 2, 120, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, 90:] = False
    call = AttentionCall("single:0", n_cond_tokens=10, n_image_tokens=110)
    backend = LandmarkBackend(LandmarkSettings(min=16))
    out = backend(q, k, v, call, keep)
    # changing padded keys/values must not change anything
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 90:] = 1e3
    v2[1, :, 90:] = -1e3
    torch.testing.assert_close(backend(q, k2, v2, call, keep), out)
    idx, valid = backend.indices(k, call, keep)
    ref = _naive(q, k, v, [idx[i][valid[i]] for i in range(b)], d ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # an additive float mask of the same key padding gives the same result
    additive = torch.zeros(b, 1, 1, n).masked_fill(~keep[:, None, None, :], float("-inf"))
    torch.testing.assert_close(backend(q, k, v, call, additive), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_under_inference_mode(dtype: torch.dtype) -> None:
    q, k, v = (torch.randn(1, 2, 80, 16) for _ in range(3))
    call = AttentionCall("single:0", n_cond_tokens=8, n_image_tokens=72)
    backend = LandmarkBackend()
    ref = backend(q, k, v, call)
    with torch.inference_mode():
        out = backend(q.to(dtype), k.to(dtype), v.to(dtype), call)
    assert out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_registered_and_served_through_session() -> None:
    session = Session({"backend": "landmark", "loggers": [], "plugins": {"landmark": {"fraction": 0.5}}},
                      _plugins())
    backend = session.backends.get("landmark")
    assert isinstance(backend, LandmarkBackend) and backend.settings.fraction == 0.5
    assert not backend.capabilities.exact and not backend.capabilities.learned
    q, k, v = (torch.randn(1, 2, 100, 8) for _ in range(3))
    call = AttentionCall("single:0", n_cond_tokens=4, n_image_tokens=96, step_index=0)
    out = session.attention(q, k, v, call)
    torch.testing.assert_close(out, backend(q, k, v, call))
    assert session.stats["single:0"].served["landmark"] == 1


def test_full_mask_is_not_supported() -> None:
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    full = torch.rand(1, 2, 10, 10) > 0.5
    reasons = LandmarkBackend().not_supported_reasons(q, k, v, AttentionCall("x", n_image_tokens=10), full)
    assert any("full" in r for r in reasons)


def test_memory_estimate_grows_with_tokens() -> None:
    backend = LandmarkBackend()
    small = backend.memory_estimate(*(torch.empty(1, 24, 4608, 128),) * 3,
                                    AttentionCall("x", n_cond_tokens=512, n_image_tokens=4096))
    big = backend.memory_estimate(*(torch.empty(1, 24, 16896, 128),) * 3,
                                  AttentionCall("x", n_cond_tokens=512, n_image_tokens=16384))
    assert 0 < small < big
