"""The joint ttr layer (plugins/ttr/joint.py): exact wherever conditioning tokens take part, learned image↔image.

Its PyTorch math is checked against a float64 reference built here from first principles — explicit masks over
each query's exact set (every text key, the image landmarks, the query's Chebyshev window on the grid) and its far
set (the other unpadded image keys) — for both combinations, with key padding, a query subset and no grid; the text
rows against SDPA bit for bit; gradients; the measured start of the log-scale; checkpoints (round trip, refusals,
older files); the config's layer selection.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from attnplug.core.call import AttentionCall, LayerSpec
from attnplug.core.checkpoint import load_checkpoint, save_checkpoint
from attnplug.core.config import ConfigError, load_config
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.landmark.settings import LandmarkSettings
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.joint import JointLayer
from attnplug.plugins.ttr.layer import TtrLayer
from attnplug.plugins.ttr.settings import TtrSettings

HEADS, DIM, N_COND, GRID = 2, 8, 5, (5, 6)
N = N_COND + GRID[0] * GRID[1]
TINY = {"feature_dim": 16, "hidden": 32, "key_chunk": 7, "query_chunk": 9}
LANDMARKS = {"fraction": 0.1, "min": 2, "window": 1}


def _backend(combine: str = "shared", landmarks: dict | None = None, **ttr) -> TtrBackend:
    lm = LandmarkBackend(LandmarkSettings(**(LANDMARKS if landmarks is None else landmarks)))
    settings = TtrSettings(**{**TINY, "joint_layers": ["double:*"], "joint": {"combine": combine}, **ttr})
    return TtrBackend(settings, landmark=lm.branch)


def _call(grid: tuple[int, int] | None = GRID, sigma: float | None = 0.7, n_cond: int = N_COND) -> AttentionCall:
    return AttentionCall("double:0", "double", 0, sigma=sigma, n_cond_tokens=n_cond, n_image_tokens=N - n_cond,
                         latent_grid=grid, host="test")


def _qkv(b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, HEADS, N, DIM, generator=g) for _ in range(3))  # type: ignore[return-value]


def _perturb(layer: JointLayer, seed: int = 1) -> None:
    """Nonzero log-scale and conditioner weights, so that every term of the reference matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith(("log_scale", "conditioner.fc2", "alpha_logit")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


# ---- the float64 reference ------------------------------------------------------------------------------------
def _masks(backend: TtrBackend, k: torch.Tensor, call: AttentionCall, keep: torch.Tensor | None,
           window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(exact, far)` `[B, N, N]` bool for image query rows (text rows: every valid key), built from first
    principles: landmarks from the landmark backend's own choice, the window from grid coordinates."""
    b = k.shape[0]
    n_cond = call.cond_in(N)
    owner = backend.landmark_branch().__self__
    idx, valid = owner.indices(k, call, None if keep is None else keep.float().log()[:, None, None, :])
    valid_keys = torch.ones(b, N, dtype=torch.bool) if keep is None else keep.clone()
    landmark = torch.zeros(b, N, dtype=torch.bool)
    for i in range(b):
        sel = idx if idx.dim() == 1 else idx[i][valid[i]]
        landmark[i, sel] = True
    exact = torch.zeros(b, N, N, dtype=torch.bool)
    far = torch.zeros(b, N, N, dtype=torch.bool)
    h, w = call.latent_grid or (0, 0)
    for qi in range(N):
        if qi < n_cond:
            exact[:, qi] = valid_keys
            continue
        near = torch.zeros(N, dtype=torch.bool)
        if window and call.latent_grid is not None:
            qy, qx = divmod(qi - n_cond, w)
            for kj in range(n_cond, N):
                ky, kx = divmod(kj - n_cond, w)
                near[kj] = max(abs(ky - qy), abs(kx - qx)) <= window
        is_text = torch.arange(N) < n_cond
        exact[:, qi] = valid_keys & (is_text | landmark | near)
        far[:, qi] = valid_keys & ~is_text & ~landmark & ~near
    return exact, far


def _reference(backend: TtrBackend, layer: JointLayer, q, k, v, call, keep=None, window: int = 1) -> torch.Tensor:
    """The joint layer's output in float64 from the explicit masks."""
    exact, far = _masks(backend, k, call, keep, window)
    q64, k64, v64 = q.double(), k.double(), v.double()
    eps = backend.settings.eps
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(DIM)
    s_e = scores.masked_fill(~exact[:, None], float("-inf"))
    o_e = torch.softmax(s_e, dim=-1) @ v64
    lse = torch.logsumexp(s_e, dim=-1)
    with torch.no_grad():
        pq = layer.phi(q64, "q", torch.float64, eps)
        pk = layer.phi(k64, "k", torch.float64, eps)
    kern = (pq @ pk.transpose(-1, -2)) * far[:, None].double()
    den = kern.sum(-1)
    o_far = (kern @ v64) / (den + eps)[..., None]
    cond = layer.condition(call, q.device)
    cond = None if cond is None else cond.detach().double()
    if cond is not None:
        o_far = o_far * (1 + cond[0]) + cond[1]
    if layer.combine == "shared":
        g = layer.alpha_logit.detach().double().view(1, -1, 1) + torch.einsum(
            "bhnd,hd->bhn", q64, layer.log_scale_q.detach().double())
        arg = torch.log(den) + g - lse + (0.0 if cond is None else cond[2])
        w_far = torch.sigmoid(arg)[..., None]
        y = o_e + w_far * (o_far - o_e)
    else:
        if cond is not None:
            o_e = o_e * (1 + cond[2]) + cond[3]
        logit = layer.alpha_logit.detach().double().view(1, -1, 1, 1)
        y = o_far + layer.alpha_max * torch.sigmoid(logit) * (o_e - o_far)  # non-adaptive α
    n_cond = call.cond_in(N)
    text = torch.softmax(scores.masked_fill(~exact[:, None], float("-inf")), dim=-1) @ v64
    return torch.cat([text[:, :, :n_cond], y[:, :, n_cond:]], dim=2)


# ---- math -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combine", ["shared", "blend"])
def test_matches_the_float64_reference(combine):
    backend = _backend(combine, adaptive_alpha=False)
    q, k, v = _qkv()
    call = _call()
    layer = backend.layer(LayerSpec.from_tensors("double:0", q))
    assert isinstance(layer, JointLayer)
    _perturb(layer)
    got = backend.forward(q, k, v, call)
    torch.testing.assert_close(got.double(), _reference(backend, layer, q, k, v, call), atol=2e-5, rtol=1e-4)


def test_key_padding_of_text_and_image_keys():
    backend = _backend()
    q, k, v = _qkv()
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[0, 1] = keep[0, N_COND + 7] = keep[1, N - 1] = keep[1, N_COND + 12] = False
    mask = torch.zeros(2, 1, 1, N).masked_fill(~keep[:, None, None, :], float("-inf"))
    call = _call()
    layer = backend.layer(LayerSpec.from_tensors("double:0", q))
    _perturb(layer)
    got = backend.forward(q, k, v, call, mask)
    want = _reference(backend, layer, q, k, v, call, keep)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_text_rows_are_sdpa_bit_for_bit():
    backend = _backend()
    q, k, v = _qkv()
    out = backend.forward(q, k, v, _call())
    sdpa = F.scaled_dot_product_attention(q[:, :, :N_COND], k, v)
    assert torch.equal(out[:, :, :N_COND], sdpa)
    assert out.dtype == q.dtype


def test_a_query_subset_gives_the_rows_of_the_whole_sequence():
    backend = _backend()
    q, k, v = _qkv()
    call = _call()
    backend.layer(LayerSpec.from_tensors("double:0", q))
    _perturb(backend.layers["double:0"])
    full = backend.forward(q, k, v, call)
    rows = torch.tensor([0, 3, N_COND, N_COND + 9, N - 1])
    backend.layers["double:0"].calibrated = True  # compare the same weights (no measurement of a_h here)
    part = backend.train_forward("double:0", q[:, :, rows], k, v, call, query_index=rows)
    torch.testing.assert_close(part.detach(), full[:, :, rows], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="query_index"):
        backend.train_forward("double:0", q[:, :, rows], k, v, call)


def test_without_a_grid_the_window_drops_out_warned_once(caplog):
    backend = _backend()
    q, k, v = _qkv()
    call = _call(grid=None)
    layer = backend.layer(LayerSpec.from_tensors("double:0", q))
    _perturb(layer)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        got = backend.forward(q, k, v, call)
        backend.forward(q, k, v, call)
    warned = [r for r in caplog.records if "needs the latent grid" in r.getMessage()]
    assert len(warned) == 1
    torch.testing.assert_close(got.double(), _reference(backend, layer, q, k, v, call, window=0),
                               atol=2e-5, rtol=1e-4)


def test_only_text_tokens_or_no_far_set_stay_finite():
    # every image key a landmark: the far set is empty, the shared normaliser gives the exact softmax
    backend = _backend(landmarks={"fraction": 1.0, "min": 0, "window": 1})
    q, k, v = _qkv()
    call = _call()
    out = backend.forward(q, k, v, call)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


# ---- training ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combine,log_scale", [("shared", "linear"), ("shared", "mlp"), ("blend", "linear")])
def test_gradients_reach_phi_and_the_log_scale(combine, log_scale):
    backend = _backend(combine, joint={"combine": combine, "log_scale": log_scale})
    q, k, v = _qkv()
    backend.layer(LayerSpec.from_tensors("double:0", q))
    out = backend.train_forward("double:0", q, k, v, _call())
    (out[:, :, N_COND:] - v[:, :, N_COND:]).pow(2).mean().backward()
    groups = backend.param_groups("double:0")
    grads = {n: p.grad for n, p in backend.layers["double:0"].named_parameters()}
    names = ["alpha_logit", "phi_q.weights.0", "phi_k.weights.1", "conditioner.fc2.weight"]
    if combine == "shared":
        names += ["log_scale_q"] + (["log_scale_net.2.weight"] if log_scale == "mlp" else [])
    for name in names:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert groups["alpha"] == [backend.layers["double:0"].alpha_logit]
    assert {id(p) for p in groups["phi"]} | {id(groups["alpha"][0])} == \
        {id(p) for p in backend.layers["double:0"].parameters()}


def test_the_first_training_call_measures_the_log_scale():
    """a_h is set so that the mean mixing logit of the call's image queries is the true one: log far mass minus
    log φ(q)ᵀz_far, i.e. w's logit is right on average from the first update on."""
    backend = _backend()
    q, k, v = _qkv()
    call = _call(sigma=None)
    layer = backend.layer(LayerSpec.from_tensors("double:0", q))
    assert not layer.calibrated
    backend.train_forward("double:0", q, k, v, call)
    assert layer.calibrated and float(layer.log_scale_calibrated) == 1.0
    exact, far = _masks(backend, k, call, None, 1)
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(DIM)
    true_far = torch.logsumexp(scores.masked_fill(~far[:, None], float("-inf")), dim=-1)[:, :, N_COND:]
    with torch.no_grad():
        pq = layer.phi(q.double(), "q", torch.float64, 1e-6)
        pk = layer.phi(k.double(), "k", torch.float64, 1e-6)
    den = ((pq @ pk.transpose(-1, -2)) * far[:, None].double()).sum(-1)[:, :, N_COND:]
    want = (true_far - den.log()).mean(dim=(0, 2))
    torch.testing.assert_close(layer.alpha_logit.detach().double(), want, atol=1e-4, rtol=1e-4)
    before = layer.alpha_logit.detach().clone()
    backend.train_forward("double:0", q * 2, k, v, call)  # measured once: later calls leave it to the optimizer
    assert torch.equal(layer.alpha_logit.detach(), before)


# ---- checkpoints and config --------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_refusals(tmp_path):
    backend = _backend()
    q, k, v = _qkv()
    for key in ("double:0", "single:0"):
        backend.layer(LayerSpec(key, HEADS, DIM))
    backend.train_forward("double:0", q, k, v, _call())
    _perturb(backend.layers["double:0"])
    path = tmp_path / "joint.safetensors"
    save_checkpoint(path, {"backend.ttr": backend.state()})
    tensors, meta = load_checkpoint(path)["backend.ttr"]
    assert meta["version"] == 3 and meta["layers"]["double:0"]["variant"] == "joint"
    assert "variant" not in meta["layers"]["single:0"]
    loaded = _backend()
    loaded.load_state(tensors, meta)
    assert isinstance(loaded.layers["double:0"], JointLayer) and type(loaded.layers["single:0"]) is TtrLayer
    assert loaded.layers["double:0"].calibrated
    torch.testing.assert_close(loaded.forward(q, k, v, _call()), backend.forward(q, k, v, _call()))

    with pytest.raises(ValueError, match=r"layer double:0: the checkpoint holds a joint layer, the config selects "
                                         r"the hybrid layer.*joint_layers"):
        _backend(joint_layers=[]).load_state(tensors, meta)
    with pytest.raises(ValueError, match=r"layer single:0: the checkpoint holds a hybrid layer, the config selects "
                                         r"the joint layer"):
        _backend(joint_layers=["*"]).load_state(tensors, meta)
    with pytest.raises(ValueError, match=r'joint\.combine: checkpoint has .shared., config has .blend.*'
                                         r'\[plugins\.ttr\.joint\] combine = "shared"'):
        _backend("blend").load_state(tensors, meta)
    with pytest.raises(ValueError, match="joint.log_scale"):
        _backend(joint={"combine": "shared", "log_scale": "mlp"}).load_state(tensors, meta)
    untouched = _backend()
    with pytest.raises(ValueError):
        untouched.load_state(tensors, {**meta, "settings": {**meta["settings"], "joint": {"combine": "blend"}}})
    assert not untouched.layers  # nothing changes on a refusal


def test_files_without_joint_layers_keep_version_2_and_load_anywhere(tmp_path):
    hybrid = TtrBackend(TtrSettings(**TINY), landmark=LandmarkBackend(LandmarkSettings(**LANDMARKS)).branch)
    hybrid.layer(LayerSpec("single:0", HEADS, DIM))
    tensors, meta = hybrid.state()
    assert meta["version"] == 2
    # an older file (no joint fields in its settings at all) loads where the joint layers select other keys
    old = {**meta, "settings": {k: v for k, v in meta["settings"].items() if k not in ("joint_layers", "joint")}}
    loaded = _backend("blend")
    loaded.load_state(tensors, old)
    assert type(loaded.layers["single:0"]) is TtrLayer


def test_config_selects_the_variant_per_layer_pattern(tmp_path):
    cfg = load_config({"backend": "ttr", "plugins": {"ttr": {"joint_layers": ["double:*", "single:3-4"],
                                                             "joint": {"combine": "blend"}}}})
    settings = cfg.section("ttr")
    assert [settings.variant_for(k) for k in ("double:7", "single:3", "single:5")] == ["joint", "joint", "hybrid"]
    path = tmp_path / "bad.toml"
    path.write_text('backend = "ttr"\n[plugins.ttr]\njoint_layers = ["single:5-3"]\n[plugins.ttr.joint]\n'
                    'combine = "both"\nrank = 2\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for needle in ("bad.toml", "joint_layers", "single:5-3", "joint.combine", "'shared' or 'blend'", "joint.rank"):
        assert needle in text, (needle, text)
    with pytest.raises(ConfigError, match="kernel = 'triton'.*joint"):
        load_config({"backend": "ttr", "plugins": {"ttr": {"joint_layers": ["double:*"], "kernel": "triton",
                                                           "joint": {"combine": "blend"}}}})


def test_served_without_the_landmark_backend_falls_back_with_a_reason():
    backend = TtrBackend(TtrSettings(**TINY, joint_layers=["double:*"], landmark=False))
    q, k, v = _qkv()
    reasons = backend.not_supported_reasons(q, k, v, _call())
    assert any("exact_attention" in r for r in reasons), reasons
    hybrid_call = AttentionCall("single:0", "single", 0, n_cond_tokens=N_COND, n_image_tokens=N - N_COND)
    assert backend.not_supported_reasons(q, k, v, hybrid_call) == []


def test_memory_estimate_of_a_joint_layer_counts_its_window():
    """The memory a host reserves before a joint layer's call (ComfyUI's reservation, OOM handling) is an estimate
    that grows with the exact window around each query."""
    q, k, v = _qkv(b=1)
    without = _backend(landmarks={**LANDMARKS, "window": 0}).memory_estimate(q, k, v, _call())
    with_window = _backend().memory_estimate(q, k, v, _call())
    assert isinstance(with_window, int) and 0 < without < with_window
    training = _backend().memory_estimate(q, k, v, _call(), training=True)
    assert training >= with_window
