"""Fixtures and helpers shared by the ComfyUI tests (tests/test_comfy_*.py): the stand-in installed for a
test module, inference mode around every test, a tiny model and a CFG sampling run on it.

tests/ is not a package: a test file loads this module with `importlib` and binds the fixtures it uses
to module-level names (pytest finds fixtures by the names in the test module).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_install", Path(__file__).with_name("install.py"))
assert _spec is not None and _spec.loader is not None
stub_install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stub_install)

# smallest ttr settings the stand-in model trains and serves with
TINY_TTR = {"feature_dim": 16, "hidden": 32}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The ComfyUI stand-in, installed for the whole test module (models under a temporary folder)."""
    with stub_install.installed(tmp_path_factory.mktemp("models")):
        yield


@pytest.fixture(autouse=True)
def inference(comfy: None) -> Iterator[None]:
    """Every test runs under `torch.inference_mode`, as ComfyUI samples."""
    with torch.inference_mode():
        yield


def tiny_model(seed: int = 0) -> Any:
    """A `ModelPatcher` around the stand-in's tiny Flux-like model, initialised from `seed`."""
    import comfy.model_base
    import comfy.model_patcher

    torch.manual_seed(seed)
    return comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel())


def sample(patcher: Any, steps: int = 4, cfg: float = 2.0, seed: int = 1, txt: int = 5, hw: int = 8) -> torch.Tensor:
    """One CFG sampling run of `patcher` on seeded random conds and noise (flux sigmas)."""
    import comfy.samplers

    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.randn(1, txt, 16, generator=g), torch.randn(1, txt, 16, generator=g)
    noise = torch.randn(1, 4, hw, hw, generator=g)
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    return guider.sample(noise, comfy.samplers.flux_sigmas(steps))


def sample_served(patcher: Any, **sample_kw: Any) -> tuple[torch.Tensor, dict[str, dict[str, Any]]]:
    """`sample(patcher, ...)` on a bound model, and what served each layer (layer → backend → calls),
    read from the binding's session just before the run finishes (the run's end releases it)."""
    from attnplug.hosts.comfy import current_binding

    binding = current_binding(patcher)
    served: dict[str, dict[str, Any]] = {}
    orig = binding.handle.finish

    def finish() -> Any:
        served.update({k: dict(s.served) for k, s in binding.handle.session.stats.items()})
        return orig()

    binding.handle.finish = finish
    return sample(patcher, **sample_kw), served


def all_nodes() -> list[Any]:
    """Every node class attnplug registers with ComfyUI (main and utility nodes)."""
    from attnplug.hosts.comfy.nodes import NODES
    from attnplug.hosts.comfy.nodes_utils import NODES as UTILS

    return [*NODES, *UTILS]
