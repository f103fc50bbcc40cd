"""The joint ttr layer's fused serve path (`kernels.joint_plan.JointServePlan`) against its PyTorch forward.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported) at small sizes in fp32 — shared
combine with and without the window, with and without the conditioner, several batch elements and hedgehog
features; the plan is built once per shape and rebuilt after a training step; the settings the fused path does
not cover (blend, the MLP log-scale, key padding) take the PyTorch path with their reasons. GPU (skipped without
CUDA): a Flux-like shape in bf16. Outputs are poisoned (NaN) before each check, so an element the kernels leave
unwritten fails.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import interpreted, gpu, PlanCounter  # noqa: E402

from attnplug.core.call import AttentionCall, LayerSpec
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.landmark.settings import LandmarkSettings
from attnplug.plugins.ttr import kernels
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.joint import JointLayer
from attnplug.plugins.ttr.settings import TtrSettings


HEADS, DIM, N_COND, GRID = 2, 16, 5, (5, 7)
N = N_COND + GRID[0] * GRID[1]
TINY = {"feature_dim": 16, "hidden": 32}


def _pair(window: int = 1, kernel: str = "triton", landmarks: dict | None = None, **ttr):
    """A backend on the fused path and one on the PyTorch path with the same settings."""
    def make(kind: str) -> TtrBackend:
        lm = LandmarkBackend(LandmarkSettings(**{"fraction": 0.1, "min": 2, "window": window, **(landmarks or {})}))
        settings = TtrSettings(**{**TINY, "joint_layers": ["double:*"], "kernel": kind, **ttr})
        return TtrBackend(settings, landmark=lm.branch)
    return make(kernel), make("torch")


def _call(sigma: float | None = 0.7, grid=GRID, n=N, n_cond=N_COND) -> AttentionCall:
    return AttentionCall("double:0", "double", 0, sigma=sigma, cfg_scale=3.0, n_cond_tokens=n_cond,
                         n_image_tokens=n - n_cond, latent_grid=grid, host="test")


def _qkv(b: int = 2, n: int = N, d: int = DIM, heads: int = HEADS, seed: int = 0, dtype=torch.float32,
         device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _perturb(layer: JointLayer, seed: int = 1) -> None:
    """Nonzero log-scale, a_h and conditioner weights, so that every term of the shared normaliser matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith(("log_scale", "conditioner.fc2", "alpha_logit")):
                p.copy_((0.3 * torch.randn(p.shape, generator=g)).to(p.device))


def _layers(fused: TtrBackend, ref: TtrBackend, q: torch.Tensor) -> JointLayer:
    layer = fused.layer(LayerSpec.from_tensors("double:0", q), q.device)
    assert isinstance(layer, JointLayer)
    _perturb(layer)
    ref.layer(LayerSpec.from_tensors("double:0", q), q.device).load_state_dict(layer.state_dict())
    return layer



@interpreted
@pytest.mark.parametrize("window, sigma, activation", [(1, 0.7, "elu+1"), (0, 0.7, "elu+1"), (2, None, "elu+1"),
                                                       (1, 0.4, "hedgehog")])
def test_fused_joint_call_matches_the_pytorch_forward(poison, monkeypatch, window, sigma, activation):
    fused, ref = _pair(window, activation=activation, feature_dim=32 if activation == "hedgehog" else 16)
    q, k, v = _qkv()
    _layers(fused, ref, q)
    count = PlanCounter(monkeypatch, "JointServePlan")
    call = _call(sigma)
    with torch.inference_mode():
        got = fused(q, k, v, call)
        want = ref(q, k, v, call)
    assert count.built == 1  # served fused (kernel = 'triton' raises where it cannot)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@interpreted
def test_plan_is_reused_and_rebuilt_after_a_training_step(poison, monkeypatch):
    fused, ref = _pair(1)
    q, k, v = _qkv(seed=3)
    layer = _layers(fused, ref, q)
    count = PlanCounter(monkeypatch, "JointServePlan")
    with torch.inference_mode():
        first = fused(q, k, v, _call())
        again = fused(q, k, v, _call())
    assert count.built == 1 and torch.equal(first, again)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    loss = fused.train_forward("double:0", q, k, v, _call()).square().mean()
    loss.backward()
    opt.step()
    ref.layers["double:0"].load_state_dict(layer.state_dict())
    with torch.inference_mode():
        after = fused(q, k, v, _call())
        want = ref(q, k, v, _call())
    assert count.built == 2
    torch.testing.assert_close(after, want, atol=2e-5, rtol=1e-4)
    assert ((after - first).norm() / first.norm()) > 1e-3  # the step changed the layer: the check can fail


@pytest.mark.parametrize("ttr, why", [({"joint": {"combine": "blend"}}, "combine 'blend'"),
                                      ({"joint": {"log_scale": "mlp"}}, "log_scale 'mlp'")])
def test_settings_without_a_fused_pass_take_the_pytorch_path(ttr, why):
    with pytest.raises(ValueError, match="kernel = 'triton'"):
        _pair(1, **ttr)
    auto, _ = _pair(1, kernel="auto", **ttr)
    q, _, _ = _qkv()
    layer = auto.layer(LayerSpec.from_tensors("double:0", q))
    reasons = kernels.joint_unsupported_reasons(layer.combine, layer.log_scale_kind, N, N, False)
    assert len(reasons) == 1 and why in reasons[0]
    assert not kernels.joint_unsupported_reasons("shared", "linear", N, N, False)


@interpreted
def test_key_padding_is_served_by_the_pytorch_path_with_a_reason(poison):
    fused, _ = _pair(1)
    q, k, v = _qkv()
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[1, -4:] = False
    mask = torch.zeros(2, 1, 1, N).masked_fill(~keep[:, None, None, :], float("-inf"))
    with torch.inference_mode(), pytest.raises(ValueError, match="key"):
        fused(q, k, v, _call(), mask)


@interpreted
def test_the_guard_keeps_non_finite_rows_out(poison):
    fused, ref = _pair(1)
    q, k, v = _qkv(seed=4)
    _layers(fused, ref, q)
    q[0, 1, N_COND + 3] = float("inf")  # φ(q) of that row is not finite: its far field neither
    flag = torch.zeros(1, dtype=torch.int32)
    with torch.inference_mode():
        got = fused.forward_guarded(q, k, v, _call(), None, flag)
    assert torch.isfinite(got[:, :, N_COND:]).all()
    assert int(flag) == 1


@gpu
@pytest.mark.parametrize("window", [0, 2])
def test_gpu_bf16_matches_the_pytorch_path(window):
    grid = (32, 32)
    n = 512 + grid[0] * grid[1]
    fused, ref = _pair(window, landmarks={"fraction": 0.02, "min": 16}, feature_dim=128, hidden=256)
    q, k, v = _qkv(1, n, 128, 24, dtype=torch.bfloat16, device="cuda")
    _layers(fused, ref, q)
    call = _call(grid=grid, n=n, n_cond=512)
    with torch.inference_mode():
        got = fused(q, k, v, call).float()
        want = ref(q, k, v, call).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert torch.isfinite(got).all() and rel < 2e-2, rel


@interpreted
@pytest.mark.parametrize("window", [0, 1])
@pytest.mark.parametrize("impl", ["sdpa", "tma"])
def test_landmark_softmax_first_continued_by_the_joint_pass(poison, monkeypatch, window, impl):
    """landmark_impl 'sdpa' (cuDNN on a GPU, plain PyTorch here) and 'tma' (the TMA-fed kernel, over the exact set's
    rows the key pass wrote): the joint pass goes on from the landmark softmax's output and log-sum-exp."""
    real = kernels.JointServePlan
    monkeypatch.setattr(kernels, "JointServePlan", lambda *a, **kw: real(*a, **{**kw, "landmark_impl": impl}))
    fused, ref = _pair(window)
    q, k, v = _qkv(seed=2)
    _layers(fused, ref, q)
    with torch.inference_mode():
        got = fused(q, k, v, _call())
        want = ref(q, k, v, _call())
    plan = next(iter(fused.layers["double:0"].serve_cache.entries.values())).plan
    assert plan.landmark_impl == impl
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
