"""The hybrid layer: blend formula, α bounds, conditioner identity, dtypes, training contract, routing."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from attnplug.core import AttentionCall, LayerSpec, Plugins, Session
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.landmark.settings import LandmarkSettings
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.settings import TtrSettings

BUILTINS = {"core": "attnplug.core.builtin", "landmark": "attnplug.plugins.landmark.plugin",
            "ttr": "attnplug.plugins.ttr.plugin"}


def _plugins() -> Plugins:
    return Plugins(builtins=BUILTINS, load_entry_points=False)


def _qkv(b=2, h=3, n=96, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(3))


CALL = AttentionCall("single:2", block_type="single", block_index=2, n_cond_tokens=16, n_image_tokens=80,
                     sigma=0.6, cfg_scale=3.5, step_index=0)


ALPHA_MAX = 0.2  # pinned: the formula is checked at this bound (the default is 0.5)


def _pair(**kw):
    """A hybrid backend and a kernel-only twin sharing its weights; α_max = ALPHA_MAX unless given, the landmark
    branch without a window (CALL has no latent grid; tests/test_landmark_window.py covers the window)."""
    lm = LandmarkBackend(LandmarkSettings(window=0))
    kw.setdefault("alpha_max", ALPHA_MAX)
    hybrid = TtrBackend(TtrSettings(feature_dim=32, hidden=32, **kw), landmark=lm.branch)
    kernel = TtrBackend(TtrSettings(feature_dim=32, hidden=32, **kw), landmark=None)
    spec = LayerSpec("single:2", 3, 16)
    kernel.layer(spec).load_state_dict(hybrid.layer(spec).state_dict())
    return hybrid, kernel, lm


@pytest.mark.parametrize("adaptive", [True, False])
def test_blend_formula(adaptive: bool) -> None:
    hybrid, kernel, lm = _pair(adaptive_alpha=adaptive)
    with torch.no_grad():
        hybrid.layers["single:2"].alpha_logit.copy_(torch.tensor([-2.0, 0.0, 1.0]))
    q, k, v = _qkv()
    out = hybrid(q, k, v, CALL)
    out_k = kernel(q, k, v, CALL).double()
    out_l = lm(q, k, v, CALL).double()
    logit = torch.tensor([-2.0, 0.0, 1.0], dtype=torch.float64).view(1, 3, 1)
    if adaptive:
        d = 1 - F.cosine_similarity(out_k, out_l, dim=-1)
        d_norm = torch.clamp(d / d.mean(-1, keepdim=True), max=3) / 3
        alpha = ALPHA_MAX * torch.sigmoid(logit + 2.0 * (d_norm - 0.5))
    else:
        alpha = ALPHA_MAX * torch.sigmoid(logit).expand(2, 3, 96)
    ref = out_k + alpha.unsqueeze(-1) * (out_l - out_k)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    metrics = hybrid.layer_metrics("single:2")
    assert math.isclose(metrics["alpha_mean"], float(alpha.mean()), rel_tol=1e-4)


@pytest.mark.parametrize("alpha_max", [0.2, 0.5])
@pytest.mark.parametrize("logit", [-1e4, -30.0, -2.197, 0.0, 30.0, 1e4])
def test_alpha_stays_inside_bounds(logit: float, alpha_max: float) -> None:
    hybrid, _, _ = _pair(alpha_max=alpha_max)
    layer = hybrid.layer(LayerSpec("single:2", 3, 16))
    with torch.no_grad():
        layer.alpha_logit.fill_(logit)
    out_k = torch.randn(2, 3, 50, 16)
    out_l = torch.randn(2, 3, 50, 16) * torch.rand(2, 3, 50, 1) * 10
    out_l[:, :, :5] = out_k[:, :, :5]  # some tokens agree exactly (d = 0), others disagree a lot
    alpha = layer.alpha(out_k, out_l)
    assert bool((alpha > 0).all()) and bool((alpha < alpha_max).all())


@pytest.mark.parametrize("alpha_max", [0.2, 0.5])
def test_initial_alpha_is_small(alpha_max: float) -> None:
    """α starts at alpha_max·alpha_init: 0.02 for the previous default's bound, 0.05 for today's."""
    hybrid, _, _ = _pair(adaptive_alpha=False, alpha_max=alpha_max)
    q, k, v = _qkv()
    hybrid(q, k, v, CALL)
    assert math.isclose(hybrid.layer_metrics("single:2")["alpha_mean"], alpha_max * 0.1, rel_tol=1e-5)


def test_conditioner_is_identity_at_init() -> None:
    hybrid, _, _ = _pair()
    q, k, v = _qkv()
    with_sigma = hybrid(q, k, v, CALL)
    without = hybrid(q, k, v, CALL.with_(sigma=None, cfg_scale=None))
    assert torch.equal(with_sigma, without)
    layer = hybrid.layers["single:2"]
    assert torch.equal(layer.conditioner(0.6, 3.5, torch.device("cpu")), torch.zeros(4))
    # and it is live: a non-zero last layer changes the output
    with torch.no_grad():
        layer.conditioner.fc2.bias.copy_(torch.tensor([0.5, 0.1, 0.0, 0.0]))
    assert not torch.allclose(hybrid(q, k, v, CALL), with_sigma)


def test_hybrid_respects_key_padding() -> None:
    hybrid, _, _ = _pair()
    q, k, v = _qkv(n=96)
    keep = torch.ones(2, 96, dtype=torch.bool)
    keep[0, 70:] = False
    out = hybrid(q, k, v, CALL, keep)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 70:] = 50.0
    v2[0, :, 70:] = -50.0
    torch.testing.assert_close(hybrid(q, k2, v2, CALL, keep), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inference_mode_dtypes(dtype: torch.dtype) -> None:
    hybrid, _, _ = _pair()
    q, k, v = _qkv()
    ref = hybrid(q, k, v, CALL)
    with torch.inference_mode():
        out = hybrid(q.to(dtype), k.to(dtype), v.to(dtype), CALL)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_layer_built_under_inference_mode_still_trains() -> None:
    hybrid, _, _ = _pair()
    q, k, v = _qkv()
    with torch.inference_mode():
        hybrid(q, k, v, CALL.with_(layer_key="single:7"))  # builds the module inside inference mode
    out = hybrid.train_forward("single:7", q, k, v, CALL.with_(layer_key="single:7"))
    out.square().mean().backward()
    assert all(p.grad is not None for p in hybrid.param_groups("single:7")["phi"][:2])


def test_training_contract() -> None:
    hybrid, _, _ = _pair()
    q, k, v = _qkv()
    served = hybrid(q, k, v, CALL)  # no running mean of d yet: α normalises d by the call's own mean
    groups = hybrid.param_groups("single:2")
    layer = hybrid.layers["single:2"]
    all_ids = sorted(id(p) for p in layer.parameters())
    assert sorted(id(p) for g in groups.values() for p in g) == all_ids
    assert [id(p) for p in groups["alpha"]] == [id(layer.alpha_logit)]
    assert any(p is layer.conditioner.fc2.weight for p in groups["phi"])
    out = hybrid.train_forward("single:2", q, k, v, CALL)
    assert out.dtype == torch.float32 and out.requires_grad
    torch.testing.assert_close(out.detach(), served)  # training normalises by the call's mean too
    out.square().mean().backward()
    assert layer.alpha_logit.grad is not None and bool((layer.alpha_logit.grad != 0).any())
    assert layer.phi_k.weights[0].grad is not None
    assert layer.conditioner.fc2.weight.grad is not None  # zero-init layer still learns
    with pytest.raises(KeyError, match="no module yet"):
        hybrid.train_forward("double:0", q, k, v, CALL)


def test_memory_estimate() -> None:
    backend = TtrBackend(TtrSettings(), landmark=LandmarkBackend().branch)
    call = AttentionCall("single:0", n_cond_tokens=512, n_image_tokens=4096)
    small = torch.empty(1, 24, 4608, 128, dtype=torch.bfloat16)
    big = torch.empty(1, 24, 16896, 128, dtype=torch.bfloat16)
    inf_small = backend.memory_estimate(small, small, small, call)
    inf_big = backend.memory_estimate(big, big, big, call.with_(n_image_tokens=16384))
    train = backend.memory_estimate(small, small, small, call, training=True)
    assert 0 < inf_small < inf_big and train > inf_small
    # inference at 1024² stays below one exact [B, H, N, N] fp32 score matrix (~2 GB)
    assert inf_small < 24 * 4608 * 4608 * 4


def test_session_routing_and_landmark_lookup(caplog) -> None:
    q, k, v = _qkv(n=96)
    cfg = {"backend": "ttr", "exact": "sdpa", "loggers": [], "plugins": {"ttr": {"feature_dim": 32}}}
    session = Session(cfg, _plugins())
    backend = session.backends.get("ttr")
    assert isinstance(backend, TtrBackend) and backend.settings.feature_dim == 32
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(session.attention(q, k, v, CALL), exact)  # not ready: exact (fail-closed)
    backend.layer(LayerSpec.from_tensors(CALL.layer_key, q))
    backend.ready[CALL.layer_key] = True
    session.router.invalidate()
    out = session.attention(q, k, v, CALL)
    assert session.stats[CALL.layer_key].served["ttr"] == 1
    assert backend.residual() is session.backends.get("landmark")
    assert backend.landmark_branch() == session.backends.get("landmark").branch
    torch.testing.assert_close(out, backend(q, k, v, CALL))

    # landmark plugin blocked: ttr runs kernel-only
    with caplog.at_level(logging.INFO, logger="attnplug"):
        blocked = Session({**cfg, "disable_plugins": ["landmark"]}, _plugins())
        tb = blocked.backends.get("ttr")
        tb.layer(LayerSpec.from_tensors(CALL.layer_key, q)).load_state_dict(backend.layers[CALL.layer_key].state_dict())
        tb.ready[CALL.layer_key] = True
        out_k = blocked.attention(q, k, v, CALL)
    assert tb.landmark_branch() is None and "kernel-only" in caplog.text
    assert blocked.stats[CALL.layer_key].served["ttr"] == 1
    assert not torch.allclose(out_k, out)


def test_config_refuses_ttr_as_exact_backend() -> None:
    from attnplug.core import ConfigError
    with pytest.raises(ConfigError, match="learned"):
        Session({"exact": "ttr", "loggers": []}, _plugins())
