"""The kernel-regression branch against a naive O(N²) reference with explicit normalized kernel weights."""
from __future__ import annotations

import itertools

import pytest
import torch

from attnplug.core import AttentionCall
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.kernel_regression import kv_state, query_pass
from attnplug.plugins.ttr.layer import TtrLayer
from attnplug.plugins.ttr.settings import TtrSettings

EPS = 1e-6


def naive_phi(x: torch.Tensor, net, activation: str, l2: bool) -> torch.Tensor:
    """φ written out head by head with explicit float64 linear layers (independent of feature_map)."""
    b, h, n, _ = x.shape
    out = []
    for head in range(h):
        z = x[:, head].double()
        layers = list(zip(net.weights, net.biases))
        for i, (w, bias) in enumerate(layers):
            g = 0 if w.shape[0] == 1 else head
            z = z @ w[g].double() + bias[g].double()
            if i < len(layers) - 1:
                z = z * torch.sigmoid(z)  # SiLU
        if activation == "elu+1":
            z = torch.where(z > 0, z + 1.0, torch.exp(z))
        elif activation == "relu":
            z = z.clamp_min(0.0)
        else:
            pos, neg = torch.exp(z - z.max(-1, keepdim=True).values), torch.exp(-z - (-z).max(-1, keepdim=True).values)
            z = torch.cat([pos / pos.sum(-1, keepdim=True), neg / neg.sum(-1, keepdim=True)], -1)
        if l2:
            z = z / z.norm(dim=-1, keepdim=True).clamp_min(EPS)
        out.append(z)
    return torch.stack(out, dim=1)


def naive_kernel(layer: TtrLayer, q, k, v, keep=None) -> torch.Tensor:
    """out_i = Σ_j w_ij v_j with w_ij = κ(q_i, k_j) / (Σ_j κ(q_i, k_j) + ε), κ = φ(q)·φ(k)."""
    pq = naive_phi(q, layer.phi_q, layer.activation, layer.l2_norm)
    pk = naive_phi(k, layer.phi_k or layer.phi_q, layer.activation, layer.l2_norm)
    kernel = pq @ pk.transpose(-1, -2)  # [B, H, Nq, Nk], explicit
    if keep is not None:
        kernel = kernel * keep[:, None, None, :].double()
    weights = kernel / (kernel.sum(-1, keepdim=True) + EPS)
    return weights @ v.double()


CASES = [(act, depth, per_head, split, l2) for (act, depth), (per_head, split, l2) in zip(
    itertools.product(["elu+1", "hedgehog", "relu"], [1, 2, 3]),
    itertools.cycle([(False, True, False), (True, True, True), (False, False, True), (True, False, False)]))]


@pytest.mark.parametrize("activation, depth, per_head, split_qk, l2_norm", CASES)
def test_matches_naive_reference(activation, depth, per_head, split_qk, l2_norm) -> None:
    s = TtrSettings(activation=activation, depth=depth, per_head=per_head, split_qk=split_qk, l2_norm=l2_norm,
                    feature_dim=32, hidden=24, landmark=False, key_chunk=13, query_chunk=7)
    backend = TtrBackend(s)
    b, h, n, d = 2, 3, 50, 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    call = AttentionCall("single:1", n_cond_tokens=10, n_image_tokens=40)
    out = backend(q, k, v, call)
    ref = naive_kernel(backend.layers["single:1"], q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_queries_and_keys_of_different_lengths() -> None:
    backend = TtrBackend(TtrSettings(feature_dim=16, hidden=32, landmark=False))
    q = torch.randn(1, 2, 9, 8)
    k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    out = backend(q, k, v, AttentionCall("x"))
    torch.testing.assert_close(out.double(), naive_kernel(backend.layers["x"], q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key_chunk, query_chunk", [(1, 1), (7, 5), (64, 3), (1000, 1000)])
def test_chunk_size_invariance(key_chunk: int, query_chunk: int) -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 64, 16) for _ in range(3))
    call = AttentionCall("single:0", n_cond_tokens=8, n_image_tokens=56, sigma=0.3)
    base = TtrBackend(TtrSettings(feature_dim=32, key_chunk=64, query_chunk=64, landmark=False))
    ref = base(q, k, v, call)
    other = TtrBackend(TtrSettings(feature_dim=32, key_chunk=key_chunk, query_chunk=query_chunk, landmark=False))
    other.layer(base.specs["single:0"]).load_state_dict(base.layers["single:0"].state_dict())
    torch.testing.assert_close(other(q, k, v, call), ref, atol=2e-6, rtol=1e-5)


def test_key_padding_equals_truncation() -> None:
    backend = TtrBackend(TtrSettings(feature_dim=16, hidden=32, landmark=False, key_chunk=6))
    q, k, v = (torch.randn(2, 2, 30, 8) for _ in range(3))
    keep = torch.ones(2, 30, dtype=torch.bool)
    keep[1, 20:] = False
    call = AttentionCall("x")
    out = backend(q, k, v, call, keep)
    torch.testing.assert_close(out[1], backend(q[1:], k[1:, :, :20], v[1:, :, :20], call)[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[0], backend(q[:1], k[:1], v[:1], call)[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), naive_kernel(backend.layers["x"], q, k, v, keep), atol=1e-5, rtol=1e-5)


def test_reference_functions_compose() -> None:
    """kv_state + query_pass on precomputed features equal the explicit kernel average."""
    pq, pk = torch.rand(1, 2, 11, 16), torch.rand(1, 2, 23, 16)
    v = torch.randn(1, 2, 23, 4)
    keep = torch.rand(1, 23) > 0.3
    s, z = kv_state(pk, v, keep, chunk=5)
    assert s.dtype == torch.float32 and s.shape == (1, 2, 16, 4) and z.shape == (1, 2, 16)
    out, den = query_pass(pq, s, z, EPS, chunk=4)
    kern = (pq @ pk.transpose(-1, -2)) * keep[:, None, None, :]
    torch.testing.assert_close(den, kern.sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, (kern @ v) / (kern.sum(-1, keepdim=True) + EPS), atol=1e-5, rtol=1e-5)


def test_feature_dim_must_be_multiple_of_16() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        TtrSettings(feature_dim=40)
    assert TtrSettings(feature_dim=48).feature_dim == 48
