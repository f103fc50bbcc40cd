"""The served ttr call: plans cached on the layer (never stale), the conditioner once per step, little host work,
and the kernels' device-side finite guard.

What a user relies on: a served call runs the cached launches of its layer and nothing else (no plan rebuilt, no
sync-prone op), yet after the layer trains it serves the new weights; a NaN in one row never reaches the image and
the layer is served exact from the next step on. CPU: Triton's interpreter at small sizes (fp32, fp16).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import interpreted, PlanCounter  # noqa: E402

from attnplug.core import AttentionCall, LayerSpec, Session  # noqa: E402
from attnplug.plugins.landmark.backend import LandmarkBackend  # noqa: E402
from attnplug.plugins.landmark.settings import LandmarkSettings  # noqa: E402
from attnplug.plugins.ttr.backend import TtrBackend  # noqa: E402
from attnplug.plugins.ttr.kernels import (KernelConfig, landmark_reference, landmark_window_reference,  # noqa: E402
                                          random_phi, ttr_forward_fused)
from attnplug.plugins.ttr.kernels import launchers  # noqa: E402
from attnplug.plugins.ttr.settings import TtrSettings  # noqa: E402

# the interpreter warns about the NaN and inf these tests feed it on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
N_COND, GRID, HEADS, DIM = 5, (4, 6), 2, 16
N = N_COND + GRID[0] * GRID[1]
TILES = KernelConfig(lm_block_m=16, lm_warps=2, lm_stages=1, lm_block=16, lm_window_block=16, q_block_m=16,
                     q_warps=2, q_stages=1)


def _qkv(dtype=torch.float32, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, N, DIM, generator=g).to(dtype) for _ in range(3)]


def _call(step: int = 0, sigma: float = 0.6) -> AttentionCall:
    return AttentionCall("single:0", block_type="single", block_index=0, n_cond_tokens=N_COND,
                         n_image_tokens=GRID[0] * GRID[1], latent_grid=GRID, sigma=sigma, cfg_scale=3.0,
                         step_index=step, host="test")


# ---- the kernels' guard ---------------------------------------------------------------------------------------
#: (landmarks, window, adaptive, d_reference): kernel-only, fixed α, adaptive in two passes and in one pass
GUARDED = [(False, 0, False, None), (True, 0, False, None), (True, 2, True, None),
           (True, 2, True, torch.tensor([0.05, 0.2]))]


@interpreted
@pytest.mark.parametrize("landmarks,window,adaptive,d_ref", GUARDED, ids=["kernel-only", "fixed", "two-pass",
                                                                           "one-pass"])
def test_guard_replaces_non_finite_rows_and_raises_the_flag(poison, landmarks, window, adaptive, d_ref):
    """The second batch element's kernel branch goes non-finite (an infinite scale in its affine): its rows come
    back as the landmark branch's rows (kernel-only: zeros), the first element's exactly as without the guard, and
    the flag goes up; a clean call leaves it down."""
    q, k, v = _qkv(seed=1, batch=2)
    g = torch.Generator().manual_seed(3)
    pq, pk = (random_phi(DIM, 32, 16, 2, generator=g) for _ in range(2))
    idx = LandmarkBackend(LandmarkSettings(fraction=0.1, min=3)).indices(k, _call())[0] if landmarks else None
    kw = dict(landmark_idx=idx, alpha_logit=torch.tensor([-1.0, 0.5]), alpha_max=0.9, adaptive=adaptive,
              config=TILES, strict=True, d_reference=d_ref)
    if window:
        kw.update(window=window, grid=GRID, n_cond=N_COND)
    flag = torch.zeros(1, dtype=torch.int32)
    aff = torch.tensor([[0.1, 0.01, -0.1, 0.02], [0.1, 0.01, -0.1, 0.02]])
    clean = ttr_forward_fused(q, k, v, pq, pk, branch_affine=aff, finite_flag=flag, **kw)
    assert int(flag) == 0 and torch.equal(clean, ttr_forward_fused(q, k, v, pq, pk, branch_affine=aff, **kw))
    aff[1, 0] = float("inf")
    plain = ttr_forward_fused(q, k, v, pq, pk, branch_affine=aff, **kw)
    assert not torch.isfinite(plain[1]).any()  # what the guard keeps out (the test can fail)
    out = ttr_forward_fused(q, k, v, pq, pk, branch_affine=aff, finite_flag=flag, **kw)
    assert int(flag) == 1 and bool(torch.isfinite(out).all())
    assert torch.equal(out[0], plain[0])
    if not landmarks:
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        return
    if window:
        out_l = landmark_window_reference(q, k, v, idx, window, GRID, N_COND)
    else:
        out_l = landmark_reference(q, k, v, idx)
    torch.testing.assert_close(out[1], out_l[1] * 0.9 + 0.02, atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("window", [0, 2])
def test_guard_serves_the_landmark_row_where_the_blend_overflows_fp16(poison, window):
    """The kernel branch's bias pushes every blended row past fp16's range (inf once cast): each row is then the
    landmark branch's (after its affine), as the reference computes it."""
    q, k, v = _qkv(torch.float16, seed=2)
    g = torch.Generator().manual_seed(4)
    pq, pk = (random_phi(DIM, 32, 16, 2, generator=g) for _ in range(2))
    idx = LandmarkBackend(LandmarkSettings(fraction=0.1, min=3)).indices(k, _call())[0]
    aff = [0.0, 1e5, 0.1, 0.02]
    kw = dict(landmark_idx=idx, alpha_logit=-1.0, alpha_max=0.5, adaptive=False, branch_affine=aff, config=TILES,
              strict=True)
    if window:
        kw.update(window=window, grid=GRID, n_cond=N_COND)
    assert torch.isinf(ttr_forward_fused(q, k, v, pq, pk, **kw)).any()
    flag = torch.zeros(1, dtype=torch.int32)
    out = ttr_forward_fused(q, k, v, pq, pk, finite_flag=flag, **kw)
    if window:
        out_l = landmark_window_reference(q, k, v, idx, window, GRID, N_COND)
    else:
        out_l = landmark_reference(q, k, v, idx)
    want = out_l * 1.1 + 0.02
    assert int(flag) == 1
    torch.testing.assert_close(out.float(), want, atol=3e-3, rtol=3e-3)


# ---- the backend: plans and conditioner rows cached, never stale ---------------------------------------------------
def _backend(kernel: str = "triton", **kw) -> TtrBackend:
    lm = LandmarkBackend(LandmarkSettings(fraction=0.1, min=3, window=2))
    return TtrBackend(TtrSettings(kernel=kernel, feature_dim=16, hidden=32, alpha_max=0.9, **kw), landmark=lm)


def _trained_pair():
    fused, ref = _backend(), _backend("torch")
    spec = LayerSpec("single:0", HEADS, DIM)
    layer = fused.layer(spec, torch.device("cpu"))
    with torch.no_grad():
        layer.conditioner.fc2.bias.copy_(torch.tensor([0.1, 0.02, -0.1, 0.01]))
    ref.layer(spec, torch.device("cpu")).load_state_dict(layer.state_dict())
    return fused, ref



@interpreted
def test_plan_is_built_once_and_rebuilt_after_a_training_step(poison, monkeypatch):
    """Served twice: one plan. The distiller's step changes the weights (an optimizer step, in place): the next
    call builds a new plan and serves the new weights, as the PyTorch path does — never the old ones."""
    fused, ref = _trained_pair()
    count = PlanCounter(monkeypatch, "ServePlan")
    q, k, v = _qkv(seed=5)
    with torch.inference_mode():
        first = fused(q, k, v, _call())
        again = fused(q, k, v, _call())
    assert count.built == 1 and torch.equal(first, again)
    layer = fused.layers["single:0"]
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    loss = fused.train_forward("single:0", q, k, v, _call()).square().mean()
    loss.backward()
    opt.step()
    ref.layers["single:0"].load_state_dict(layer.state_dict())
    with torch.inference_mode():
        after = fused(q, k, v, _call())
        want = ref(q, k, v, _call())
    assert count.built == 2
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)
    assert ((after - first).norm() / first.norm()) > 1e-3  # the step changed the layer: the check can fail


@interpreted
def test_served_plan_loads_the_conditioning_landmarks_directly_and_matches_the_gather(poison, monkeypatch):
    """The backend tells its plan that the landmarks begin with the call's conditioning tokens (it never reads the
    indices, which on a GPU would sync): the plan loads those rows as they lie, and the output equals the same layer
    served with every landmark row gathered."""
    import dataclasses

    from attnplug.plugins.ttr import kernels
    from attnplug.plugins.ttr.kernels import tiles

    plans: list = []
    real = kernels.ServePlan
    monkeypatch.setattr(kernels, "ServePlan", lambda *a, **kw: plans.append(real(*a, **kw)) or plans[-1])
    fused, _ = _trained_pair()
    q, k, v = _qkv(seed=9)
    with torch.inference_mode():
        direct = fused(q, k, v, _call())
    assert len(plans) == 1 and plans[0].config.lm_direct == 1 and plans[0].n_direct == N_COND
    gathered, _ = _trained_pair()
    gathered.layer(LayerSpec("single:0", HEADS, DIM), torch.device("cpu")).load_state_dict(
        fused.layers["single:0"].state_dict())
    with tiles.using_config(dataclasses.replace(tiles.DEFAULT_CONFIG, lm_direct=0)), torch.inference_mode():
        want = gathered(q, k, v, _call())
    assert plans[-1].n_direct == 0
    torch.testing.assert_close(direct, want, atol=1e-5, rtol=1e-5)


@interpreted
def test_conditioner_rows_are_computed_once_per_sigma_for_every_layer(poison):
    backend = _backend()
    q, k, v = _qkv(seed=6)
    keys = ["single:0", "single:1", "single:2"]
    bank = backend.conditioner_bank
    with torch.inference_mode():
        for key in keys:  # the first step builds the layers: each new layer restacks the bank
            backend(q, k, v, _call(0, 0.9).with_(layer_key=key))
        built = bank.computed
        for step, sigma in ((1, 0.9), (2, 0.5)):
            for key in keys:
                backend(q, k, v, _call(step, sigma).with_(layer_key=key))
    assert bank.computed == built + 1  # σ 0.9 again: cached; σ 0.5: one batched op for all three layers
    ref = _backend("torch")
    for key in keys:
        ref.layer(LayerSpec(key, HEADS, DIM), torch.device("cpu")).load_state_dict(backend.layers[key].state_dict())
    with torch.inference_mode():
        got = backend(q, k, v, _call(3, 0.5).with_(layer_key="single:2"))
        torch.testing.assert_close(got, ref(q, k, v, _call(3, 0.5).with_(layer_key="single:2")), atol=1e-5,
                                   rtol=1e-5)
    assert bank.computed == built + 1


def test_served_call_launches_its_kernels_and_little_else(monkeypatch):
    """A steady-state served call through `Session.attention`: the kernels' launches (stubbed here) and a handful
    of buffer ops — no plan, no conditioner MLP, no isfinite pass, nothing that reads a device value."""
    from torch.utils._python_dispatch import TorchDispatchMode

    launches: list[str] = []
    monkeypatch.setattr(launchers, "key_pass", lambda *a, **kw: launches.append("key"))
    monkeypatch.setattr(launchers, "query_pass", lambda *a, **kw: launches.append("query"))
    monkeypatch.setattr("attnplug.plugins.ttr.kernels.capability.triton_available", lambda device: (True, ""))
    session = Session({"backend": "ttr", "exact": "sdpa", "loggers": [], "strict": True,
                       "plugins": {"ttr": {"kernel": "triton", "feature_dim": 16, "hidden": 32},
                                   "landmark": {"fraction": 0.1, "min": 3, "window": 2}}})
    ttr = session.backends.get("ttr")
    ttr.ready["single:0"] = True
    q, k, v = _qkv(torch.float16, seed=7)
    session.attention(q, k, v, _call())  # builds the layer
    ttr.layers["single:0"].set_d_reference(torch.full((HEADS,), 0.1))  # a distilled layer's running mean of d
    session.attention(q, k, v, _call())  # builds the plan (of these weights) and the conditioner rows

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    launches.clear()
    with Ops() as mode, torch.inference_mode():
        session.attention(q, k, v, _call())
    assert launches == ["key", "query"]  # one key pass, one query pass (adaptive α in one pass, the window in it)
    assert len(mode.ops) <= 8, mode.ops  # the S/z buffer, S's cast, the output, their views
    forbidden = {"_local_scalar_dense", "item", "isfinite", "linear", "addmm", "baddbmm", "index_fill", "arange"}
    assert not forbidden & set(mode.ops), mode.ops
    assert session.stats["single:0"].served["ttr"] == 3


@interpreted
def test_session_keeps_a_nan_row_out_and_serves_the_layer_exact_afterwards(poison):
    """finite_check = 'per_step' (default) on the fused path: the NaN row comes back finite from the very call that
    produced it (the kernels' guard), the flag is read at the next step, and the layer is exact from then on."""
    session = Session({"backend": "ttr", "exact": "sdpa", "loggers": [],
                       "plugins": {"ttr": {"kernel": "triton", "feature_dim": 16, "hidden": 32},
                                   "landmark": {"fraction": 0.1, "min": 3, "window": 2}}})
    session.backends.get("ttr").ready["single:0"] = True
    q, k, v = _qkv(seed=8)
    q[0, 0, N_COND + 3] = float("nan")
    with torch.inference_mode():
        out = session.attention(q, k, v, _call(0))
        assert bool(torch.isfinite(out).all())
        exact = session.attention(q, k, v, _call(1))
    stats = session.stats["single:0"]
    assert stats.served == {"ttr": 1, "sdpa": 1}
    assert stats.fallbacks["non-finite output (replaced on the device)"] == 1
    torch.testing.assert_close(exact, torch.nn.functional.scaled_dot_product_attention(q, k, v), equal_nan=True)
