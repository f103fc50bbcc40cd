"""torch.compile of the ttr backend (hybrid with landmark branch) at a small size on CPU.

The forward and the training path compile as ONE graph (`fullgraph=True`: landmark selection runs
on Python ints and is folded in, guarded on shapes). Here they are compiled with the `aot_eager`
backend, which exercises dynamo capture and AOT autograd but not code generation: inductor's C++
codegen takes ~75 s for the inference graph plus ~35 s for training on 2 CPU cores, beyond this
suite's budget. Set ATTNPLUG_SLOW_TESTS=1 (or run on a CUDA machine) to also run inductor.
"""
from __future__ import annotations

import os

import pytest
import torch

from attnplug.core import AttentionCall, LayerSpec
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.plugins.ttr.backend import TtrBackend
from attnplug.plugins.ttr.settings import TtrSettings

CALL = AttentionCall("single:0", n_cond_tokens=8, n_image_tokens=56, sigma=0.5, cfg_scale=2.0)
SLOW = os.environ.get("ATTNPLUG_SLOW_TESTS") == "1" or torch.cuda.is_available()


def _setup(device: str = "cpu"):
    torch._dynamo.reset()
    lm = LandmarkBackend()
    backend = TtrBackend(TtrSettings(feature_dim=32, hidden=32, key_chunk=16, query_chunk=32), landmark=lm.branch)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g).to(device) for _ in range(3))
    backend.layer(LayerSpec("single:0", 2, 16), torch.device(device))
    return backend, q, k, v


def _check(compiler_backend: str, device: str = "cpu") -> None:
    backend, q, k, v = _setup(device)
    ref = backend(q, k, v, CALL)
    infer = torch.compile(lambda q, k, v: backend(q, k, v, CALL), backend=compiler_backend, fullgraph=True)
    with torch.inference_mode():
        out = infer(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out_bf16 = infer(q.bfloat16(), k.bfloat16(), v.bfloat16())  # recompiles for the dtype
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), ref, atol=3e-2, rtol=3e-2)

    layer = backend.layers["single:0"]
    eager = backend.train_forward("single:0", q, k, v, CALL)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    train = torch.compile(lambda q, k, v: backend.train_forward("single:0", q, k, v, CALL),
                          backend=compiler_backend, fullgraph=True)
    compiled = train(q, k, v)
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled.detach(), eager.detach(), atol=1e-5, rtol=1e-5)
    assert grads.keys() == {n for n, p in layer.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        torch.testing.assert_close(layer.get_parameter(n).grad, g, atol=1e-5, rtol=1e-4)


def test_compiles_as_one_graph_aot_eager() -> None:
    _check("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="inductor codegen takes minutes on CPU; set ATTNPLUG_SLOW_TESTS=1")
def test_compiles_with_inductor() -> None:
    _check("inductor", "cuda" if torch.cuda.is_available() else "cpu")
