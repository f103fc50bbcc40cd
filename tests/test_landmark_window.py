"""The landmark branch's local 2-D window (`[plugins.landmark] window = r`) against a dense reference.

The reference builds the allowed-key mask `[B, Nq, Nk]` explicitly — landmarks ∪ the image keys
within Chebyshev radius r of the query's grid position for image queries, the landmarks alone for
conditioning queries, minus padded keys — and runs a masked softmax in float64.
"""
from __future__ import annotations

import logging

import pytest
import torch
from attnplug.core import AttentionCall, LayerSpec
from attnplug.plugins.landmark.attention import gather_landmarks, landmark_softmax, window_table
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.landmark.settings import LandmarkSettings
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.settings import TtrSettings
from pydantic import ValidationError

N_COND = 3


def _call(grid: tuple[int, int] | None, n_img: int, n_cond: int = N_COND) -> AttentionCall:
    return AttentionCall("single:1", n_cond_tokens=n_cond, n_image_tokens=n_img, latent_grid=grid, sigma=0.6,
                         host="test")


def _backend(window: int, **kw) -> LandmarkBackend:
    """Few landmarks (so windows hold many non-landmark keys) and a small query chunk (several chunks)."""
    settings = {"fraction": 0.1, "min": 3, "layout": "even", "query_chunk": 7, "window": window, **kw}
    return LandmarkBackend(LandmarkSettings(**settings))


def allowed_mask(backend: LandmarkBackend, k: torch.Tensor, call: AttentionCall,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, Nk, Nk]` bool: which keys each query of the full sequence may attend (built explicitly)."""
    b, n_keys = k.shape[0], k.shape[2]
    n_cond, r = call.n_cond_tokens, backend.settings.window
    _, w = call.latent_grid
    idx, valid = backend.indices(k, call, keep)
    landmarks = torch.zeros(b, n_keys, dtype=torch.bool)
    for i in range(b):
        landmarks[i, idx if idx.dim() == 1 else idx[i][valid[i]]] = True
    pos = torch.arange(n_keys)
    img = pos >= n_cond
    y, x = (pos - n_cond).clamp_min(0) // w, (pos - n_cond).clamp_min(0) % w
    near = ((y[:, None] - y[None, :]).abs() <= r) & ((x[:, None] - x[None, :]).abs() <= r)
    window = near & img[:, None] & img[None, :]  # image queries, image keys
    allowed = landmarks[:, None, :] | window[None]
    if keep is not None:
        allowed = allowed & keep[:, None, :]
    return allowed


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention in float64; rows with no allowed key give zeros."""
    logits = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.nan_to_num(torch.softmax(logits, -1), nan=0.0)
    return weights @ v.double()


def _qkv(b: int, n: int, h: int = 2, d: int = 8, grad: bool = False) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(b, h, n, d, dtype=torch.float32, requires_grad=grad) for _ in range(3))


@pytest.mark.parametrize("grid", [(4, 4), (3, 7), (6, 5), (1, 9)])
@pytest.mark.parametrize("radius", [1, 2])
def test_matches_dense_reference(grid: tuple[int, int], radius: int) -> None:
    n_img = grid[0] * grid[1]
    q, k, v = _qkv(2, N_COND + n_img)
    call = _call(grid, n_img)
    backend = _backend(radius)
    allowed = allowed_mask(backend, k, call)
    # the cases the window must handle: landmarks inside windows (counted once) and clipped borders
    table, inside = window_table(grid, radius)
    idx, _ = backend.indices(k, call)
    assert torch.isin(table[inside] + N_COND, idx).any()
    assert not bool(inside[0].all())
    out = backend.branch(q, k, v, call)
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_window_covers_every_key_equals_full_attention() -> None:
    """A radius that spans the grid makes every image query see every key: exact attention for them."""
    grid = (3, 5)
    q, k, v = _qkv(1, N_COND + 15)
    out = _backend(5).branch(q, k, v, _call(grid, 15))
    full = dense_reference(q, k, v, torch.ones(1, N_COND + 15, N_COND + 15, dtype=torch.bool))
    torch.testing.assert_close(out[:, :, N_COND:].double(), full[:, :, N_COND:], atol=1e-5, rtol=1e-5)


def test_key_padding_mask_is_respected() -> None:
    grid = (5, 6)
    n = N_COND + 30
    q, k, v = _qkv(2, n)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, 1] = False  # a conditioning token
    keep[1, N_COND + 7:N_COND + 14] = False  # image tokens next to many windows
    call = _call(grid, 30)
    backend = _backend(2)
    out = backend.branch(q, k, v, call, keep)
    ref = dense_reference(q, k, v, allowed_mask(backend, k, call, keep))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    k2, v2 = k.clone(), v.clone()
    pad = ~keep[:, None, :, None].expand_as(k)
    k2[pad] = 1e3
    v2[pad] = -1e3
    torch.testing.assert_close(backend.branch(q, k2, v2, call, keep), out)  # masked keys never get weight
    additive = torch.zeros(2, 1, 1, n).masked_fill(~keep[:, None, None, :], float("-inf"))
    torch.testing.assert_close(backend.branch(q, k, v, call, additive), out)


@pytest.mark.parametrize("radius", [0, 2])
def test_fully_padded_element_gives_zeros_and_finite_gradients(radius: int) -> None:
    n = N_COND + 12
    q, k, v = _qkv(2, n, grad=True)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1] = False
    out = _backend(radius).branch(q, k, v, _call((3, 4), 12), keep)
    assert bool((out[1] == 0).all())
    out.sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))


def test_batch_of_eight_with_one_shared_mask_row() -> None:
    grid = (4, 6)
    n = N_COND + 24
    q, k, v = _qkv(8, n)
    keep = torch.ones(1, n, dtype=torch.bool)
    keep[0, N_COND + 5] = False
    call = _call(grid, 24)
    backend = _backend(1)
    out = backend.branch(q, k, v, call, keep)
    ref = dense_reference(q, k, v, allowed_mask(backend, k, call, keep.expand(8, -1)))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_window_zero_gives_the_landmark_output_exactly() -> None:
    grid = (4, 5)
    q, k, v = _qkv(2, N_COND + 20)
    call = _call(grid, 20)
    backend = _backend(0)
    idx, valid = backend.indices(k, call)
    old = landmark_softmax(q, gather_landmarks(k, idx), gather_landmarks(v, idx), valid, 8 ** -0.5, 7)
    assert torch.equal(backend.branch(q, k, v, call), old)
    assert torch.equal(backend(q, k, v, call), old)


def test_gradients_match_the_reference() -> None:
    grid = (3, 4)
    n = N_COND + 12
    q, k, v = _qkv(2, n, grad=True)
    call = _call(grid, 12)
    backend = _backend(1)
    weight = torch.randn(2, 2, n, 8)
    (backend.branch(q, k, v, call) * weight).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    allowed = allowed_mask(backend, k.detach(), call)
    (dense_reference(q64, k64, v64, allowed) * weight.double()).sum().backward()
    for got, want in zip(grads, (q64.grad, k64.grad, v64.grad)):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_query_index_selects_rows_of_the_full_output() -> None:
    grid = (4, 4)
    n = N_COND + 16
    q, k, v = _qkv(2, n)
    call = _call(grid, 16)
    backend = _backend(1)
    full = backend.branch(q, k, v, call)
    rows = torch.tensor([0, 2, 3, 8, 18, 11])  # conditioning and image queries, any order
    torch.testing.assert_close(backend.branch(q[:, :, rows], k, v, call, query_index=rows), full[:, :, rows])
    with pytest.raises(ValueError, match="query_index must be"):
        backend.branch(q[:, :, rows], k, v, call, query_index=rows[:3])
    with pytest.raises(ValueError, match="query_index must lie in"):
        backend.branch(q[:, :, :2], k, v, call, query_index=torch.tensor([0, n]))


@pytest.mark.parametrize("case", ["no grid", "grid mismatch", "query subset"])
def test_falls_back_to_landmarks_with_one_warning(case: str, caplog: pytest.LogCaptureFixture) -> None:
    n = N_COND + 20
    q, k, v = _qkv(1, n)
    call = _call(None if case == "no grid" else (4, 4) if case == "grid mismatch" else (4, 5), 20)
    if case == "query subset":
        q = q[:, :, :9]
    backend = _backend(2)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        out = backend.branch(q, k, v, call)
        backend.branch(q, k, v, call)
    torch.testing.assert_close(out, _backend(0).branch(q, k, v, call))
    warnings = [r for r in caplog.records if "window = 2" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_setting_is_validated_and_estimated() -> None:
    with pytest.raises(ValidationError, match="window"):
        LandmarkSettings(window=-1)
    q, k, v = _qkv(1, N_COND + 20)
    call = _call((4, 5), 20)
    assert _backend(2).memory_estimate(q, k, v, call) > _backend(0).memory_estimate(q, k, v, call)


# ---- the ttr hybrid layer with a windowed landmark branch -------------------------------------------


def _ttr(kernel: str, landmark: LandmarkBackend) -> TtrBackend:
    ttr = TtrBackend(TtrSettings(kernel=kernel, feature_dim=16, hidden=32), landmark=landmark.branch)
    layer = ttr.layer(LayerSpec("single:1", 2, 8), torch.device("cpu"))
    with torch.no_grad():
        layer.alpha_logit.fill_(1.0)  # a visible landmark share
    return ttr


def test_ttr_serves_the_windowed_branch_through_the_pytorch_path() -> None:
    grid = (4, 6)
    n = N_COND + 24
    q, k, v = _qkv(2, n)
    call = _call(grid, 24)
    landmark = _backend(2)
    ttr = _ttr("auto", landmark)
    allowed = allowed_mask(landmark, k, call)

    def reference_branch(q, k, v, call, mask):
        return dense_reference(q, k, v, allowed).float()

    layer = ttr.layers["single:1"]
    with torch.no_grad():
        want = layer(q, k, v, call, landmark=reference_branch, key_chunk=1024, query_chunk=1024)
    torch.testing.assert_close(ttr(q, k, v, call), want, atol=1e-5, rtol=1e-5)
    out = ttr.train_forward("single:1", q, k, v, call)  # the distiller's differentiable path
    out.square().mean().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in layer.parameters())
