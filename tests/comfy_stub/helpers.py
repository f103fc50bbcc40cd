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
    """The ComfyUI stand-in, installed for the whole test module (its folders under a temporary one)."""
    with stub_install.installed(tmp_path_factory.mktemp("comfyui")):
        yield


@pytest.fixture(autouse=True)
def inference(comfy: None) -> Iterator[None]:
    """Every test runs under `torch.inference_mode`, as ComfyUI samples."""
    with torch.inference_mode():
        yield


def tiny_model(seed: int = 0, heads: int = 2) -> Any:
    """A `ModelPatcher` around the stand-in's tiny Flux-like model (hidden size 32: `heads` × 32 / `heads`),
    initialised from `seed`."""
    import comfy.ldm.flux.model
    import comfy.model_base
    import comfy.model_patcher

    torch.manual_seed(seed)
    return comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(comfy.ldm.flux.model.Flux(num_heads=heads)))


def sample(patcher: Any, steps: int = 4, cfg: float = 2.0, seed: int = 1, txt: int = 5, hw: int = 8) -> torch.Tensor:
    """One CFG sampling run of `patcher` on seeded random conds and noise (flux sigmas), reporting progress
    as ComfyUI's KSampler does: one `ProgressBar.update_absolute(step + 1, total)` per step."""
    import comfy.samplers
    import comfy.utils

    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.randn(1, txt, 16, generator=g), torch.randn(1, txt, 16, generator=g)
    noise = torch.randn(1, 4, hw, hw, generator=g)
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    pbar = comfy.utils.ProgressBar(steps)
    return guider.sample(noise, comfy.samplers.flux_sigmas(steps),
                         callback=lambda step, x0, x, total: pbar.update_absolute(step + 1, total))


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


def ttr_config(**root: Any) -> dict[str, Any]:
    """A ttr config for the stand-in model (no console logger), root fields as given."""
    return {"backend": "ttr", "exact": "host", "loggers": [], "plugins": {"ttr": dict(TINY_TTR)}, **root}


def ttr_checkpoint(path: Any, ready: set[str], scores: dict[str, float] | None = None, heads: int = 2) -> None:
    """A ttr checkpoint for the stand-in Flux (`heads` × 32 / `heads`) with the given layers marked ready and,
    when given, per-layer EMA cosine distances in a distiller component (as a distiller exposes them)."""
    from attnplug.core import LayerSpec, Session, save_checkpoint

    s = Session(ttr_config())
    backend = s.learned_backends()["ttr"]
    for key in ("double:0", "double:1", "single:0", "single:1"):
        backend.layer(LayerSpec(key, heads, 32 // heads))
        backend.ready[key] = key in ready
    comps = {"backend.ttr": backend.state()}
    if scores is not None:
        comps["distiller.test"] = ({}, {"layers": {k: {"ema_cos": v, "ready": k in ready} for k, v in scores.items()}})
    save_checkpoint(path, comps)
    s.close()


def need_ttr_distiller() -> None:
    """Skip unless the ttr backend and the ttr distiller are registered (plugins/ttr)."""
    from attnplug.hosts.comfy.configs import learned_backends, registered_distillers

    if "ttr" not in learned_backends() or "ttr" not in registered_distillers():
        pytest.skip("needs the ttr backend and the ttr distiller registered (plugins/ttr)")


def distill_config(**root: Any) -> dict[str, Any]:
    """`ttr_config` with lenient readiness, so that a few short runs yield ready layers."""
    cfg = ttr_config(**root)
    cfg["plugins"]["distill"] = {"readiness_min_updates": 1, "readiness_threshold": 1.0, "query_cap": 16}
    return cfg
