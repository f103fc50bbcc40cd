"""What the Triton kernel tests share: where the kernels can run (CUDA, or Triton's interpreter on a CPU-only machine,
switched on here before anything imports triton, as conftest does), the marks that skip a test elsewhere, and a
counter of the serve plans a backend builds."""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: the kernels in Triton's interpreter: CPU-only machines with triton installed
interpreted = pytest.mark.skipif(HAS_CUDA or not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs triton's interpreter (CPU-only machine)")
#: the compiled kernels
gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


class PlanCounter:
    """Counts the plans of class `name` (`ServePlan`, `JointServePlan`) that the backend builds: it looks the class up
    in `attnplug.plugins.ttr.kernels` at every build."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        from attnplug.plugins.ttr import kernels

        self.built = 0
        real = getattr(kernels, name)

        def build(*args: Any, **kwargs: Any) -> Any:
            self.built += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, build)
