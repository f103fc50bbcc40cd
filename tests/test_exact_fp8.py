"""FP8 (e4m3) for the exact branch: `[plugins.landmark] precision = "fp8"` (core/exact_fp8.py).

What a user relies on: the option changes only the inference of the exact softmax (landmarks and window), by e4m3
rounding and no more — close to full precision but not equal to it; training keeps fp32; the fused kernels compute
what the PyTorch path emulates, for the hybrid and the joint layer, with and without the window (CPU: Triton's
interpreter; GPU: the e4m3 tensor cores); a bad value is refused naming the field; a GPU without FP8 is served in
the call's dtype, with one warning.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import gpu, interpreted  # noqa: E402

from attnplug.core.call import AttentionCall, LayerSpec  # noqa: E402
from attnplug.core.exact_fp8 import E4M3_MAX, round_e4m3, round_rows, rounded_softmax  # noqa: E402
from attnplug.plugins.landmark.backend import LandmarkBackend  # noqa: E402
from attnplug.plugins.landmark.settings import LandmarkSettings  # noqa: E402
from attnplug.plugins.ttr import backend as ttr_backend  # noqa: E402
from attnplug.plugins.ttr.backend import TtrBackend  # noqa: E402
from attnplug.plugins.ttr.kernels import random_phi, ttr_forward_fused, ttr_forward_reference  # noqa: E402
from attnplug.plugins.ttr.settings import TtrSettings  # noqa: E402

N_COND, GRID, HEADS, DIM = 6, (6, 8), 2, 32
N = N_COND + GRID[0] * GRID[1]


def _qkv(seed: int = 0, batch: int = 1, dtype=torch.float32, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, N, DIM, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _call(key: str = "single:0") -> AttentionCall:
    kind, _, index = key.partition(":")
    return AttentionCall(key, block_type=kind, block_index=int(index), n_cond_tokens=N_COND,
                         n_image_tokens=GRID[0] * GRID[1], latent_grid=GRID, sigma=0.6, cfg_scale=3.0, host="test")


# ---- the rounding ---------------------------------------------------------------------------------------------------
def test_rounding_is_e4m3_at_a_scale_per_row():
    x = torch.randn(64, 32) * torch.logspace(-3, 2, 64)[:, None]
    assert torch.equal(round_e4m3(x * 4), (x * 4).to(torch.float8_e4m3fn).float())
    assert float(round_e4m3(torch.tensor([1e4])).item()) == E4M3_MAX  # saturates, no NaN
    r = round_rows(x)
    top = x.abs().amax(-1, keepdim=True)
    assert torch.allclose(r.abs().amax(-1, keepdim=True), top)  # each row's largest value maps to 448 exactly
    # 3 mantissa bits: within half a step (2^-4 relative), subnormals within half of 2^-9 of the row's scale
    assert bool(((r - x).abs() <= x.abs() / 16 + top / E4M3_MAX * 2 ** -10 + 1e-12).all())
    assert _rel(r, x) > 1e-3  # it does round


def test_rounded_softmax_is_a_softmax_up_to_e4m3_and_zero_on_empty_rows():
    logits = torch.randn(8, 40) * 3
    logits[3] = float("-inf")
    w = rounded_softmax(logits)
    want = torch.softmax(logits[[0, 1, 2, 4, 5, 6, 7]], dim=-1)
    assert torch.equal(w[3], torch.zeros(40))
    got = w[[0, 1, 2, 4, 5, 6, 7]]
    assert 1e-4 < _rel(got, want) < 0.07
    torch.testing.assert_close(got.sum(-1), torch.ones(7), atol=0.03, rtol=0)


def test_precision_is_validated_by_name():
    with pytest.raises(ValidationError, match="precision"):
        LandmarkSettings(precision="fp16")
    assert LandmarkSettings().precision == "input"


# ---- the PyTorch path ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [0, 2])
def test_landmark_branch_rounds_at_inference_only(window):
    q, k, v = _qkv(seed=1)
    exact = LandmarkBackend(LandmarkSettings(fraction=0.2, min=4, window=window))
    fp8 = LandmarkBackend(LandmarkSettings(fraction=0.2, min=4, window=window, precision="fp8"))
    with torch.no_grad():
        full, rounded = exact.branch(q, k, v, _call()), fp8.branch(q, k, v, _call())
        lse_full = exact.exact_attention(q, k, v, _call()).lse
        lse_rounded = fp8.exact_attention(q, k, v, _call()).lse
    assert 1e-3 < _rel(rounded, full) < 0.1
    assert 1e-5 < _rel(lse_rounded, lse_full) < 0.05
    qg = q.clone().requires_grad_(True)  # training: the same fp32 softmax as without the option
    assert torch.equal(fp8.branch(qg, k, v, _call()).detach(), full)


# ---- the fused kernels against the emulation ------------------------------------------------------------------------
def _layer_args(window: int):
    idx = torch.cat([torch.arange(N_COND), torch.arange(N_COND, N, 5)])
    return dict(landmark_idx=idx, alpha_logit=1.5, alpha_max=0.9, adaptive=False, window=window,
                grid=GRID if window else None, n_cond=N_COND if window else 0, landmark_prefix=N_COND)


def _check_close_to_emulation(fused8: torch.Tensor, ref8: torch.Tensor, ref: torch.Tensor) -> None:
    """The fused FP8 output is the emulation's up to the probabilities' rounding against a running max (the
    kernels') instead of the row's final one, a fraction of what FP8 changes — and FP8 changed something."""
    rounding = _rel(ref8, ref)
    assert rounding > 1e-3
    assert _rel(fused8, ref8) < 0.5 * rounding


@interpreted
@pytest.mark.parametrize("window", [0, 2])
def test_fused_fp8_computes_what_the_reference_emulates(poison, window):
    q, k, v = _qkv(seed=2)
    phi = random_phi(DIM, 64, 32, 2)
    args = _layer_args(window)
    ref8 = ttr_forward_reference(q, k, v, phi, phi, exact_fp8=True,
                                 **{a: b for a, b in args.items() if a != "landmark_prefix"})
    ref = ttr_forward_reference(q, k, v, phi, phi, **{a: b for a, b in args.items() if a != "landmark_prefix"})
    fused8 = ttr_forward_fused(q, k, v, phi, phi, exact_fp8=True, strict=True, landmark_impl="fused", **args)
    _check_close_to_emulation(fused8, ref8, ref)


def _backends(key: str, precision: str = "fp8"):
    """A backend on the fused path and one on the PyTorch path, the same layer, the landmarks at `precision`."""
    joint = {"joint_layers": ["double:*"]} if key.startswith("double") else {}

    def make(kernel: str) -> TtrBackend:
        lm = LandmarkBackend(LandmarkSettings(fraction=0.2, min=4, window=2, precision=precision))
        return TtrBackend(TtrSettings(kernel=kernel, feature_dim=16, hidden=32, alpha_max=0.9, **joint), landmark=lm)
    fused, ref = make("triton"), make("torch")
    spec = LayerSpec(key, HEADS, DIM)
    ref.layer(spec, torch.device("cpu")).load_state_dict(fused.layer(spec, torch.device("cpu")).state_dict())
    return fused, ref


@interpreted
@pytest.mark.parametrize("key", ["single:0", "double:0"], ids=["hybrid", "joint"])
def test_served_layer_in_fp8_matches_its_pytorch_path(poison, key):
    """Through the backend, as a host calls it: the fused plan follows the landmark backend's precision."""
    q, k, v = _qkv(seed=3, batch=2)
    fused, ref = _backends(key)
    _, full = _backends(key, "input")
    full.layer(LayerSpec(key, HEADS, DIM), torch.device("cpu")).load_state_dict(ref.layers[key].state_dict())
    with torch.inference_mode():
        got, want, unrounded = fused(q, k, v, _call(key)), ref(q, k, v, _call(key)), full(q, k, v, _call(key))
    plan = next(iter(fused.layers[key].serve_cache.entries.values())).plan
    assert plan is not None and plan.fp8 == 2 and plan.landmark_impl == "fused"
    _check_close_to_emulation(got, want, unrounded)


def test_a_gpu_without_fp8_is_served_in_its_dtype_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(ttr_backend, "fp8_unsupported_reason", lambda device: "compute capability 8.0 has none")
    backend = TtrBackend(TtrSettings(), landmark=LandmarkBackend(LandmarkSettings(precision="fp8")))
    residual = backend.residual()
    assert residual is not None
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        assert backend.exact_fp8(residual, torch.device("cpu")) is False
        assert backend.exact_fp8(residual, torch.device("cpu")) is False
    assert sum("precision = 'fp8'" in r.getMessage() for r in caplog.records) == 1


# ---- on the GPU -----------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("window", [0, 2])
def test_fp8_tensor_cores_compute_what_the_reference_emulates(window):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability 8.9 or newer)")
    q, k, v = _qkv(seed=4, dtype=torch.bfloat16, device="cuda")
    phi = random_phi(DIM, 64, 32, 2, device="cuda")
    args = _layer_args(window)
    ref_args = {a: b for a, b in args.items() if a != "landmark_prefix"}
    ref8 = ttr_forward_reference(q, k, v, phi, phi, exact_fp8=True, **ref_args)
    ref = ttr_forward_reference(q, k, v, phi, phi, **ref_args)
    fused8 = ttr_forward_fused(q, k, v, phi, phi, exact_fp8=True, strict=True, landmark_impl="fused", **args)
    _check_close_to_emulation(fused8, ref8, ref)
