"""Shared fixtures: a plugin manager with only the core's built-ins, and call records."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on CPU-only machines. Set before anything (e.g.
    # inductor in the torch.compile tests) imports triton, which reads the flag at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnplug.core import AttentionCall, Plugins


@pytest.fixture
def core_plugins() -> Plugins:
    """A fresh plugin manager holding only the core plugin (no entry points, no feature packs)."""
    return Plugins(builtins={"core": "attnplug.core.builtin"}, load_entry_points=False)


@pytest.fixture
def make_call():
    def _make(layer: str = "single:0", **kw) -> AttentionCall:
        kind, _, idx = layer.partition(":")
        defaults = dict(block_type=kind if kind in ("double", "single") else "other",
                        block_index=int(idx) if idx.isdigit() else -1, step_index=0, sigma=1.0, host="test")
        defaults.update(kw)
        return AttentionCall(layer_key=layer, **defaults)

    return _make


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run torch on one thread (sampling tests are faster than with 2 threads on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer `torch.empty` allocates (the fused ttr path's outputs among them) starts as NaN, so elements a
    kernel leaves unwritten fail the check (outputs must be written completely)."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    yield
