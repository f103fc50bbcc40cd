"""A served ttr call must not make the host wait for the GPU.

A device sync inside `Session.attention` (a blocking copy of a CPU tensor to the GPU, `.item()`, `bool()` of
a device tensor) stops the CPU from queueing the next layer's work while the GPU runs this one, so every
served layer adds its Python time to the model's wall time (docs/PERFORMANCE.md, whole-model readings). With
`finite_check = "per_step"` a served call — fused kernels, landmarks, σ/CFG conditioner — has no sync at all;
torch's sync debug mode turns any into an error. GPU only.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from attnplug.core import AttentionCall
from attnplug.core.session import Session

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("triton")),
                                reason="needs CUDA and Triton")


@pytest.mark.parametrize("window", [0, 2])
def test_served_fused_call_does_not_synchronize(window: int) -> None:
    session = Session({"backend": "ttr", "exact": "sdpa", "loggers": [], "strict": True,
                       "finite_check": "per_step", "gates": [{"kind": "layers", "include": ["single:*"]}],
                       "plugins": {"ttr": {"kernel": "triton"}, "landmark": {"window": window}}})
    session.backends.get("ttr").ready["single:0"] = True  # type: ignore[attr-defined]
    session.run_start(num_steps=1, host="test")
    call = AttentionCall(layer_key="single:0", block_type="single", block_index=0, sigma=0.7, cfg_scale=3.5,
                         n_cond_tokens=64, n_image_tokens=256, latent_grid=(16, 16), host="test")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 320, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    first = session.attention(q, k, v, call)  # builds the layer, compiles the kernels, caches casts and indices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = session.attention(q, k, v, call)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert session.stats["single:0"].served["ttr"] == 2
    assert torch.equal(out, first) or torch.allclose(out.float(), first.float(), atol=2e-2)
    session.run_end()  # the per-step finite check reads its flags here (one sync, outside the call)
    assert not session.stats["single:0"].fallbacks


def test_fused_call_with_python_numbers_does_not_synchronize() -> None:
    """Library use: α logit and branch affine given as Python numbers reach the GPU without a sync."""
    from attnplug.plugins.ttr.kernels import random_phi, ttr_forward_fused

    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 4, 320, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    pq = random_phi(64, 64, 64, 2, generator=torch.Generator().manual_seed(0), device="cuda")
    idx = torch.arange(0, 320, 8, device="cuda")

    def call() -> torch.Tensor:
        return ttr_forward_fused(q, k, v, pq, pq, landmark_idx=idx, alpha_logit=-2.2,
                                 branch_affine=[0.1, 0.0, -0.1, 0.0], landmark_impl="fused", strict=True)
    first = call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(out.float(), first.float(), atol=2e-2)  # the key pass's atomics may reorder sums
