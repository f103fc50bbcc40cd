"""`attnplug bench-model` (bench/model.py): the smoke config end to end on the CPU, through the CLI.

What must hold for its GPU numbers to mean anything: native and exact-attnplug forwards of the same
weights and inputs agree, the ttr rows route exactly the gated single-block layers to ttr (counted
by `session.stats`), and `handle.remove()` leaves a native model for the next mode.
"""
from __future__ import annotations

import json

import pytest
import torch
from attnplug.bench import model as bm

MODES = ["native", "host", "sdpa", "ttr-0", "ttr-50", "ttr-100", "ttr-all"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One smoke run through the `attnplug bench-model` command (CPU, one small size, every mode)."""
    from attnplug.cli import main

    path = tmp_path_factory.mktemp("bench_model") / "model.json"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["bench-model", "--smoke", "--device", "cpu", "--sizes", "128", "--reps", "2",
                   "--modes", ",".join(MODES), "--json", str(path)])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    return json.loads(path.read_text())


def rows(report: dict) -> dict[str, dict]:
    return {r["mode"]: r for r in report["results"]}


def test_every_mode_is_timed(report: dict) -> None:
    r = rows(report)
    assert list(r) == MODES
    for mode, row in r.items():
        assert row["skipped"] is None, (mode, row["skipped"])
        assert row["ms"] > 0 and len(row["times_ms"]) == 2
        assert row["n_image"] == (128 // 16) ** 2 and row["n_txt"] == 16
        # one warm-up (the smoke default), two timed, two for the host time; a ttr mode one more warm-up after its
        # layers get their stand-in reference (it changes the kernel they run: no compile in the timed forwards)
        assert row["forwards"] == (1 + 2 + 2) + (1 if mode.startswith("ttr") else 0), mode
    assert r["native"]["x_native"] == pytest.approx(1.0)
    assert report["model"]["num_layers"] == 1 and report["model"]["num_single_layers"] == 2
    assert report["settings"]["ttr_kernel"] == "torch" and "random" in report["note"]


def test_exact_attnplug_matches_native(report: dict) -> None:
    r = rows(report)
    assert r["host"]["rel_err_vs_native"] == 0.0  # the host backend is diffusers' own call: bit-identical
    assert r["sdpa"]["rel_err_vs_native"] < 1e-2
    assert r["host"]["served_per_forward"] == {"host": 3.0}  # 1 double + 2 single attention calls
    assert r["sdpa"]["served_per_forward"] == {"sdpa": 3.0}
    assert r["native"]["served_per_forward"] == {}  # no session


def test_ttr_rows_serve_exactly_the_gated_single_layers(report: dict) -> None:
    r = rows(report)
    expect = {"ttr-0": ([], 0, None), "ttr-50": (["single:0-0"], 1, "single:0"),
              "ttr-100": (["single:*"], 2, "single:0-1")}
    for mode, (include, n_ttr, layers) in expect.items():
        row = r[mode]
        assert row["ttr_include"] == include
        assert row["served_per_forward"].get("ttr", 0) == n_ttr, (mode, row["served_per_forward"])
        assert row["served_per_forward"].get("host", 0) == 3 - n_ttr
        assert row["served_layers"].get("ttr") == layers
        assert "double" not in (row["served_layers"].get("ttr") or "")
        assert row["fallbacks"] == {}
    every = r["ttr-all"]  # the joint layer on the double block, the hybrid layer on the single blocks
    assert every["ttr_include"] == ["double:*", "single:*"] and every["fallbacks"] == {}
    assert every["served_per_forward"] == {"ttr": 3.0} and every["served_layers"]["ttr"] == "double:0, single:0-1"
    assert every["rel_err_vs_native"] > r["ttr-100"]["rel_err_vs_native"]
    assert r["ttr-0"]["rel_err_vs_native"] == 0.0
    # random φ: serving ttr really changes the output, more layers more so
    assert 0 < r["ttr-50"]["rel_err_vs_native"] and 0 < r["ttr-100"]["rel_err_vs_native"]


def test_flux_dev_shares_and_config() -> None:
    n = bm.FLUX_DEV["num_single_layers"]
    assert bm.ttr_include(0, n) == [] and bm.ttr_include(50, n) == ["single:0-18"]
    assert bm.ttr_include(100, n) == ["single:*"]
    every = bm.mode_config("ttr-50/every-call", n, "auto")
    assert every["finite_check"] == "every_call" and every["gates"][0]["include"] == ["single:0-18"]
    assert "finite_check" not in bm.mode_config("ttr-50", n, "auto")  # the default: device flags per step
    assert bm.parse_mode("ttr-100/every-call/graph") == ("ttr-100", frozenset({"every-call", "graph"}))
    assert bm.native_of("ttr-100/every-call/graph") == "native/graph" and bm.native_of("sdpa") == "native"
    for bad in ("ttr-50/per-step", "ttr-100/compile/graph", "exact", "ttr-101"):
        with pytest.raises(ValueError):
            bm.mode_config(bad, n, "auto")
    assert bm.compress_keys(["single:2", "single:0", "single:1", "double:4", "single:7"]) == \
        "double:4, single:0-2, single:7"
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        m = FluxTransformer2DModel(**bm.FLUX_DEV)
    assert len(m.transformer_blocks) == 19 and len(m.single_transformer_blocks) == 38
    assert 11.8e9 < sum(p.numel() for p in m.parameters()) < 12.0e9  # FLUX.1-dev's 11.9 B


def test_model_is_built_once_in_dtype_and_left_native(one_thread: None) -> None:
    device = torch.device("cpu")
    model = bm.build_transformer(bm.SMOKE, device, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    inputs = bm.make_inputs(bm.SMOKE, 64, 8, 1, device, torch.bfloat16)
    row = bm.Row("64²", "ttr-100", 16, 8)
    out = bm.run_mode(model, inputs, "ttr-100", row, device, 2, None, 1, 1, "torch", "default")
    assert out is not None and row.skipped is None and row.served_per_forward == {"host": 1.0, "ttr": 2.0}
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == originals
    assert "forward" not in model.__dict__  # the step hook is gone


def test_ttr_modes_serve_the_product_default_with_its_window(report: dict, one_thread: None, monkeypatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The ttr rows time the product default layer (recorded in the report), and on the Flux model the host
    reports the latent grid, so its window is used, never dropped to landmarks-only."""
    import logging

    from attnplug.plugins.landmark.backend import LandmarkBackend
    from attnplug.plugins.landmark.settings import LandmarkSettings
    from attnplug.plugins.ttr.settings import TtrSettings

    layer = report["settings"]["ttr_layer"]
    assert layer["ttr"]["alpha_max"] == TtrSettings().alpha_max and layer["ttr"]["depth"] == TtrSettings().depth
    lm = LandmarkSettings()
    assert layer["landmark"] == {"fraction": lm.fraction, "min": lm.min, "max": lm.max, "window": lm.window}
    grids: list[tuple[int, int]] = []
    table = LandmarkBackend.window_table
    monkeypatch.setattr(LandmarkBackend, "window_table",
                        lambda self, grid, n_cond, device: grids.append(grid) or table(self, grid, n_cond, device))
    device = torch.device("cpu")
    model = bm.build_transformer(bm.SMOKE, device, torch.float32)
    inputs = bm.make_inputs(bm.SMOKE, 128, 8, 1, device, torch.float32)
    row = bm.Row("128²", "ttr-100", 64, 8)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        bm.run_mode(model, inputs, "ttr-100", row, device, 2, None, 1, 1, "torch", "default")
    assert row.skipped is None and row.served_per_forward == {"host": 1.0, "ttr": 2.0}
    assert grids and set(grids) == {(8, 8)}
    assert not [r.getMessage() for r in caplog.records if "landmark" in r.getMessage()]


def test_graph_and_compile_modes_need_cuda_and_say_so(one_thread: None) -> None:
    device = torch.device("cpu")
    model = bm.build_transformer(bm.SMOKE, device, torch.float32)
    inputs = bm.make_inputs(bm.SMOKE, 64, 8, 1, device, torch.float32)
    for mode in ("ttr-100/graph", "native/compile"):
        row = bm.Row("64²", mode, 16, 8)
        assert bm.run_mode(model, inputs, mode, row, device, 2, None, 1, 1, "torch", "default") is None
        assert row.skipped is not None and "needs CUDA" in row.skipped
    row = bm.Row("64²", "ttr-100/every-call", 16, 8)
    bm.run_mode(model, inputs, "ttr-100/every-call", row, device, 2, None, 1, 2, "torch", "default")
    assert row.skipped is None and row.host_ms is not None and row.host_ms > 0
    assert row.served_per_forward == {"host": 1.0, "ttr": 2.0}


def test_fbcache_mode_times_a_skipped_step_and_takes_its_hooks_off(one_thread: None) -> None:
    """`/fbcache`: the first forward computes every block, the timed ones run the first block alone (no ttr call);
    the model is native again afterwards."""
    pytest.importorskip("diffusers.hooks")
    for bad in ("ttr-100/fbcache/graph", "native/compile/fbcache"):
        with pytest.raises(ValueError):
            bm.parse_mode(bad)
    device = torch.device("cpu")
    model = bm.build_transformer(bm.SMOKE, device, torch.float32)
    inputs = bm.make_inputs(bm.SMOKE, 64, 8, 1, device, torch.float32)
    with torch.inference_mode():
        before = model(**inputs)[0]
    row = bm.Row("64²", "ttr-100/fbcache", 16, 8)
    bm.run_mode(model, inputs, "ttr-100/fbcache", row, device, 2, before.float(), 1, 2, "torch", "default")
    assert row.skipped is None and row.forwards >= 3, row.skipped
    assert row.served_per_forward["ttr"] * row.forwards == 2  # both single blocks, on the first forward only
    assert row.served_per_forward["host"] * row.forwards == row.forwards  # the first block, every forward
    with torch.inference_mode():
        assert torch.equal(model(**inputs)[0], before)


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert bm.main(["--smoke", "--modes", "native,ttr-150"]) == 2
    assert bm.main(["--smoke", "--modes", "flash"]) == 2
    assert bm.main(["--smoke", "--sizes", "100"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused Triton path)")
def test_smoke_on_cuda_serves_ttr_with_the_fused_kernels(tmp_path) -> None:
    path = tmp_path / "model.json"
    assert bm.main(["--smoke", "--device", "cuda", "--sizes", "256", "--reps", "2", "--json", str(path)]) == 0
    r = rows(json.loads(path.read_text()))
    assert r["ttr-100"]["served_per_forward"]["ttr"] == 2 and r["ttr-100"]["fallbacks"] == {}
    assert r["host"]["rel_err_vs_native"] == 0.0
    assert r["host"]["peak_mib"] > 0
    assert r["ttr-100"]["syncs_in_attention"] == 0  # the served calls never wait for the GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_smoke_on_cuda_whole_forward_in_a_cuda_graph_and_compiled(tmp_path) -> None:
    """The whole forward with ttr serving, captured in one CUDA graph (a capture fails on any sync) and under
    torch.compile(mode="reduce-overhead"): both run, serve ttr, and the replay is the eager forward."""
    path = tmp_path / "model.json"
    modes = "native,native/graph,ttr-100,ttr-100/graph,ttr-100/compile"
    assert bm.main(["--smoke", "--device", "cuda", "--sizes", "256", "--reps", "2", "--modes", modes,
                    "--json", str(path)]) == 0
    r = rows(json.loads(path.read_text()))
    for mode in ("ttr-100/graph", "ttr-100/compile"):
        assert r[mode]["skipped"] is None and r[mode]["served_per_forward"]["ttr"] > 0, r[mode]
        assert r[mode]["rel_err_vs_native"] == pytest.approx(r["ttr-100"]["rel_err_vs_native"], rel=0.05, abs=2e-2)
    assert r["ttr-100/graph"]["rel_err_vs_eager"] < 1e-2  # the key pass's atomics may reorder sums
    assert r["ttr-100/graph"]["syncs_per_forward"] == 0 and r["ttr-100/graph"]["x_native_of"] == "native/graph"
