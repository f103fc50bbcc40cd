"""The fused ttr path agrees with the PyTorch path when weights are rebuilt and when the landmark cap binds.

`attnplug bench` on an H200 showed 1.9e-2 (default φ, landmarks capped at 1024, 2048²) and 7.9e-2
(hedgehog F = 64, 4096²) between the fused rows and the PyTorch row, while other rows agreed to ~1e-3.
Cause: the fused path's process-wide cache of weight casts was keyed on the source's address and version
only; the bench drops every layer between shapes, a new layer's weight of the same shape can land at a freed
weight's address with the same version, and the kernels then ran the old layer's φ. There is no such cache any
more: a library call casts its weights, and a served layer keeps its casts in its own serve plan.
These tests run on CPU (Triton's interpreter for the kernels; fp16, which it supports — bf16 it does not).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import interpreted  # noqa: E402

from attnplug.bench import variants as bench_variants
from attnplug.bench.variants import Shape, build_variants
from attnplug.plugins.landmark.selection import select_landmarks
from attnplug.plugins.ttr.kernels import PhiWeights, random_phi, ttr_forward_fused, ttr_forward_reference



def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _at(buf: bytearray, values: torch.Tensor) -> torch.Tensor:
    """A new tensor (own version counter, version 0) over `buf`, holding `values`: every call gives a
    different tensor at the same address — what the allocator does when a freed weight's block is reused."""
    torch.frombuffer(buf, dtype=torch.float32).copy_(values.reshape(-1))  # a throwaway writer tensor
    return torch.frombuffer(buf, dtype=torch.float32).view(values.shape)


@interpreted
def test_fused_kernels_use_the_new_weights_at_a_reused_address():
    """The whole fused forward (fp16, landmarks, adaptive α) after φ_q's weight was replaced by another at
    the same address: it must match the reference with the new weights (before the fix it ran the old ones)."""
    g = torch.Generator().manual_seed(1)
    b, h, n, d = 1, 2, 96, 32
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    pk = random_phi(d, 0, 32, 1, "hedgehog", generator=g)
    bias = 0.1 * torch.randn(16, generator=g)
    idx, _ = select_landmarks(n, 16, 0.25, 8, 16)  # the landmark plugin's selection (cap binds: 20 -> 16)
    buf = bytearray(d * 16 * 4)
    w_old, w_new = torch.randn(d, 16, generator=g) / d ** 0.5, torch.randn(d, 16, generator=g) / d ** 0.5
    outs = []
    for w in (w_old, w_new):
        pq = PhiWeights((_at(buf, w),), (bias,), activation="hedgehog")
        out = ttr_forward_fused(q.half(), k.half(), v.half(), pq, pk, landmark_idx=idx, alpha_logit=0.0,
                                landmark_impl="fused", strict=True)
        ref = ttr_forward_reference(q, k, v, pq, pk, idx, alpha_logit=0.0)
        outs.append((out, ref))
        del pq
    for out, ref in outs:
        assert _rel(out, ref) < 2e-3
    assert _rel(outs[0][1], outs[1][1]) > 1e-2  # the two weights give different layers (the test can fail)


@interpreted
def test_bench_rows_agree_when_layers_are_rebuilt_per_shape():
    """The bench's sequence: per shape, new backends and layers (random φ), the PyTorch row, then the fused
    row against it; the previous shape's layers are freed first. Every fused row must agree (fp16)."""
    dev = torch.device("cpu")
    for n in (48, 64, 80, 48, 64, 80):
        s = Shape(f"n={n}", 1, 2, n, 32, 16)
        vs = [x for x in build_variants(s, torch.float16, dev, only=["hedgehog-F64 fused flash-lm"],
                                        configs=["hedgehog-F64"], graphs=False) if x.family == "ttr"]
        by = {x.name: x for x in vs}
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, 2, n, 32, generator=g).half() for _ in range(3))
        ref = by["ttr-hedgehog-F64 torch"].make(q, k, v)()
        out = by["ttr-hedgehog-F64 fused flash-lm"].make(q, k, v)()
        assert _rel(out, ref) < 2e-3, f"n={n}: fused row {_rel(out, ref):.1e} from the PyTorch row"
        del vs, by, ref, out  # as the bench: this shape's layers go before the next shape's are built


def test_capped_landmarks_come_from_the_landmark_backend_on_both_paths():
    """previous-default-cap1024 at 2048² (16384 image tokens): 1311 image landmarks capped to 1024, and the PyTorch
    row's landmark branch is the very backend whose indices() the fused rows use."""
    reg_backend, backends = bench_variants._build_backend(
        "ttr", {**bench_variants.TTR_CONFIGS["previous-default-cap1024"][0], "kernel": "torch"},
        bench_variants.TTR_CONFIGS["previous-default-cap1024"][1])
    lm = backends.get("landmark")
    assert reg_backend.residual() is lm
    call = bench_variants._call(Shape("2048²", 1, 24, 512 + 16384, 128, 512))
    k = torch.empty(1, 1, 512 + 16384, 1)
    idx, valid = lm.indices(k, call)
    want, _ = select_landmarks(512 + 16384, 512, 0.08, 64, 1024)
    assert valid is None and torch.equal(idx, want) and idx.numel() == 512 + 1024 == lm.count(16896, 512)


@interpreted
def test_capped_landmarks_fused_rows_match_the_torch_row_in_fp32(monkeypatch):
    """A binding cap (256 image tokens, 25 % → 64, max 16) through the bench's fused rows (in-kernel and
    SDPA landmark softmax) against its PyTorch row, fp32: the same math to rounding."""
    monkeypatch.setitem(bench_variants.TTR_CONFIGS, "capped",
                        ({"depth": 2, "hidden": 64, "feature_dim": 32, "alpha_max": 0.2},
                         {"fraction": 0.25, "min": 8, "max": 16, "window": 0}))  # landmarks only (no grid here)
    s = Shape("n=272", 1, 2, 272, 32, 16)
    vs = {x.name: x for x in build_variants(s, torch.float32, torch.device("cpu"), only=["capped fused flash-lm",
                                            "capped fused sdpa-lm"], configs=["capped"], graphs=False)}
    assert vs["ttr-capped torch"].notes["n_landmarks"] == 16 + 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 272, 32, generator=g) for _ in range(3))
    ref = vs["ttr-capped torch"].make(q, k, v)()
    for impl in ("flash-lm", "sdpa-lm"):
        assert _rel(vs[f"ttr-capped fused {impl}"].make(q, k, v)(), ref) < 1e-5, impl
