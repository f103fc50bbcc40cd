"""diffusers' context parallelism (Ulysses over 2 gloo CPU processes) with attnplug applied: ttr serves the sharded
calls, and the transformer's output equals the single-process output with the same ttr layers; a layout the hook
did not see whole (`apply` before `enable_parallelism`) is passed to the host, with the reason."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))
from distributed_helpers import run_ranks  # noqa: E402

from attnplug.core import LayerSpec, Session  # noqa: E402
from attnplug.hosts.diffusers import apply  # noqa: E402

LAYERS = ("double:0", "single:0")
CONFIG = {"backend": "ttr", "exact": "host", "loggers": [],
          "plugins": {"ttr": {"feature_dim": 16, "depth": 1, "hidden": 0, "key_chunk": 5, "query_chunk": 7},
                      "landmark": {"fraction": 0.1, "min": 4, "window": 1}}}


def _model_and_inputs() -> tuple[torch.nn.Module, dict]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    h, w, n_txt = 4, 6, 8
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)),
                                         indexing="ij"), -1).reshape(-1, 3)
    args = dict(hidden_states=torch.randn(1, h * w, 4, generator=g),
                encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                guidance=None, img_ids=img_ids, txt_ids=torch.zeros(n_txt, 3), return_dict=False)
    return model, args


def _serve_ttr(model: torch.nn.Module) -> tuple[Session, object]:
    session = Session(CONFIG)
    handle = apply(model, session)
    backend = session.backends.get("ttr")
    torch.manual_seed(5)
    for key in LAYERS:  # the same layers on every process, ready to serve
        backend.layer(LayerSpec(key, 2, 16))
        backend.ready[key] = True
    return session, handle


def _forward(model: torch.nn.Module, args: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**args)[0]


def _parallel(model: torch.nn.Module, world: int) -> None:
    from diffusers.models._modeling_parallel import ContextParallelConfig

    model.set_attention_backend("native")
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))


def _worker(rank: int, world: int) -> dict:
    torch.accelerator.device_count = lambda: 1  # diffusers picks `rank % device_count` as the device (CPU: 0)
    model, args = _model_and_inputs()
    _parallel(model, world)
    session, _ = _serve_ttr(model)  # after enable_parallelism: attnplug's hook sees the whole sequence
    served = _forward(model, args)
    stats = {k: dict(s.served) for k, s in session.stats.items()}
    late, args = _model_and_inputs()
    late_session, handle = _serve_ttr(late)
    _parallel(late, world)  # after apply: the hook sees this rank's slice only
    passed = _forward(late, args)
    passthrough = {k: {str(r): int(n) for r, n in v.items()} for k, v in handle.passthrough().items()}
    return {"served": served.clone(), "stats": stats, "passed": passed.clone(), "passthrough": passthrough}


def test_context_parallel_flux_serves_ttr_and_matches_one_process(tmp_path: Path) -> None:
    results = run_ranks(_worker, 2, tmp_path, timeout=180)
    model, args = _model_and_inputs()
    exact = _forward(model, args)
    _serve_ttr(model)
    expected = _forward(model, args)
    assert not torch.allclose(expected, exact, atol=1e-3)  # ttr really changed the output
    for r in results:
        assert r["stats"] == {k: {"ttr": 1} for k in LAYERS}
        torch.testing.assert_close(r["served"], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r["passed"], exact, rtol=1e-4, atol=1e-5)
        assert set(r["passthrough"]) == set(LAYERS)
        assert all("enable_parallelism before" in reason for p in r["passthrough"].values() for reason in p)
