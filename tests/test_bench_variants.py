"""`attnplug bench` variants: every ttr configuration of TTR_CONFIGS, `--configs` / `--only` selection,
the CUDA-graph variants (skipped with a reason on CPU; captured and checked on a GPU) and the speed-up
baselines (graph rows against the graph-captured SDPA)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from attnplug.bench.run import Result, _speedups, main, parse_shape
from attnplug.bench.variants import TTR_CONFIGS, GraphCaptureError, build_variants, capture_graph, is_joint
from attnplug.plugins.ttr import kernels

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
NEW = ("hedgehog-F64", "1layer-F128", "previous-default-lm2pct", "previous-default-cap1024")
FUSED = [c for c, (tset, _) in TTR_CONFIGS.items() if not is_joint(tset)]  # the configurations with fused rows


def _names(variants):
    return [v.name for v in variants]


def test_configs_at_flux_4096_landmarks_and_costs():
    """Building the variants allocates no tensors: the 4096² shape is cheap to inspect on CPU."""
    s = parse_shape("4096", 24, 128, 512, 1)
    vs = {v.name: v for v in build_variants(s, torch.bfloat16, torch.device("cpu"))}
    assert set(NEW) <= set(TTR_CONFIGS)
    n_l = {cfg: vs[f"ttr-{cfg} torch"].notes["n_landmarks"] for cfg in TTR_CONFIGS}
    n_img = 4096 ** 2 // 256
    prev = ("previous-default", "3layer-F256", "hedgehog-F64", "1layer-F128", "previous-default-window2")
    assert {n_l[c] for c in prev} == {512 + round(0.08 * n_img)} == {5755}
    assert n_l["previous-default-lm2pct"] == n_l["default"] == 512 + round(0.02 * n_img)  # the product default: 2 %
    assert n_l["previous-default-cap1024"] == 512 + 1024  # the cap that keeps the layer linear-time
    flops = {cfg: vs[f"ttr-{cfg} torch"].cost[0] for cfg in TTR_CONFIGS}
    assert flops["previous-default-cap1024"] < flops["previous-default-lm2pct"] < flops["previous-default"]
    assert flops["previous-default-lm2pct"] < flops["default"] < flops["previous-default"]  # 2 % + the window
    assert flops["hedgehog-F64"] < flops["1layer-F128"] < flops["previous-default"]
    assert vs["ttr-hedgehog-F64 torch"].notes["settings"]["activation"] == "hedgehog"
    for cfg in TTR_CONFIGS:  # the reference rows run the PyTorch path, also where "auto" would pick the kernels
        backend = vs[f"ttr-{cfg} torch"].make.__defaults__[0]
        assert backend.settings.kernel == "torch", cfg


#: What each configuration times — (depth, hidden, F, activation, l2_norm, α_max, α's reference of d), (fraction,
#: min, max, window) — pinned for every name but the "default" ones (renamed ones under their new names): a changed
#: product default must not move them.
EFFECTIVE = {
    "previous-default": ((2, 256, 128, "elu+1", False, 0.2, "call"), (0.08, 64, 0, 0)),
    "3layer-F256": ((3, 0, 256, "elu+1", True, 0.2, "call"), (0.08, 64, 0, 0)),
    "lean": ((1, 0, 128, "elu+1", False, 0.2, "call"), (0.02, 64, 0, 0)),
    "hedgehog-F64": ((1, 256, 64, "hedgehog", False, 0.2, "call"), (0.08, 64, 0, 0)),
    "1layer-F128": ((1, 256, 128, "elu+1", False, 0.2, "call"), (0.08, 64, 0, 0)),
    "previous-default-lm2pct": ((2, 256, 128, "elu+1", False, 0.2, "call"), (0.02, 16, 0, 0)),
    "previous-default-cap1024": ((2, 256, 128, "elu+1", False, 0.2, "call"), (0.08, 64, 1024, 0)),
    "previous-default-window2": ((2, 256, 128, "elu+1", False, 0.2, "call"), (0.08, 64, 0, 2)),
    "lean-window2": ((1, 0, 128, "elu+1", False, 0.2, "call"), (0.02, 16, 0, 2)),
}
#: The product default with adaptive α's reference of d pinned either way (the rest follows the settings).
DEFAULT_PINNED = {"default-call-alpha": "call", "default-running-alpha": "running"}
#: The product default with one change (the large testbeds' front): (ttr field changes, landmark field changes).
DEFAULT_DELTAS = {
    "default-lm1pct": ({}, {"fraction": 0.01}), "default-max256": ({}, {"max": 256}),
    "default-max128": ({}, {"max": 128}), "default-window1": ({}, {"window": 1}),
    "default-window4": ({}, {"window": 4}), "default-1layer-F64": ({"depth": 1, "feature_dim": 64}, {}),
    "default-1layer-F128": ({"depth": 1, "feature_dim": 128}, {}), "default-fp8": ({}, {"precision": "fp8"}),
}


def _effective(cfg: str):
    s = parse_shape("n=64:txt=16", 2, 32, 16, 1)
    vs = {v.name: v for v in build_variants(s, torch.float32, torch.device("cpu"), configs=[cfg], graphs=False)}
    backend = vs[f"ttr-{cfg} torch"].make.__defaults__[0]
    return backend.settings, backend.residual().settings


def test_default_is_the_product_default_and_the_others_keep_their_layers():
    from attnplug.plugins.landmark.settings import LandmarkSettings
    from attnplug.plugins.ttr.settings import ARCHITECTURE_FIELDS, TtrSettings

    assert set(TTR_CONFIGS) == set(EFFECTIVE) | {"default", "joint", "joint-fp8"} | set(DEFAULT_PINNED) | \
        set(DEFAULT_DELTAS)
    t, lm = _effective("default")  # built from the settings' own defaults: it follows them
    fields = (*ARCHITECTURE_FIELDS, "alpha_reference")
    assert {f: getattr(t, f) for f in fields} == {f: getattr(TtrSettings(), f) for f in fields}
    assert lm == LandmarkSettings()
    for cfg, ref in DEFAULT_PINNED.items():
        tp, lp = _effective(cfg)
        assert tp.alpha_reference == ref and lp == lm, cfg
        assert {f: getattr(tp, f) for f in ARCHITECTURE_FIELDS} == {f: getattr(t, f) for f in ARCHITECTURE_FIELDS}
    assert (t.alpha_max, lm.fraction, lm.min, lm.max, lm.window) == (0.5, 0.02, 16, 0, 2)  # the product default
    tj, lj = _effective("joint")  # the product default's layer with the joint layer on the double blocks
    assert tj.joint_layers == ["double:*"] and lj == lm
    assert {f: getattr(tj, f) for f in ARCHITECTURE_FIELDS if f != "joint_layers"} == \
        {f: getattr(t, f) for f in ARCHITECTURE_FIELDS if f != "joint_layers"}
    tj8, lj8 = _effective("joint-fp8")  # the same with the exact branch in e4m3
    assert tj8 == tj and lj8 == lm.model_copy(update={"precision": "fp8"})
    for cfg, (dt, dl) in DEFAULT_DELTAS.items():
        td, ld = _effective(cfg)
        assert td == t.model_copy(update=dt) and ld == lm.model_copy(update=dl), cfg
    for cfg, (want_t, want_l) in EFFECTIVE.items():
        t, lm = _effective(cfg)
        got = ((t.depth, t.hidden, t.feature_dim, t.activation, t.l2_norm, t.alpha_max, t.alpha_reference),
               (lm.fraction, lm.min, lm.max, lm.window))
        assert got == (want_t, want_l), cfg
        assert (t.gamma, t.adaptive_alpha, t.per_head, t.split_qk, lm.layout) == (2.0, True, False, True, "even"), cfg


def test_renamed_configs_name_their_new_name():
    from attnplug.bench.variants import RENAMED

    s = parse_shape("n=64:txt=16", 2, 32, 16, 1)
    assert set(RENAMED.values()) <= set(TTR_CONFIGS) and not set(RENAMED) & set(TTR_CONFIGS)
    with pytest.raises(ValueError, match="default-window2 → previous-default-window2"):
        build_variants(s, torch.float32, torch.device("cpu"), configs=["default-window2"])
    assert "default-cap1024" not in TTR_CONFIGS  # an old name is not silently another layer


def test_kernel_only_once_per_feature_map_and_graph_twins():
    s = parse_shape("n=64:txt=16", 2, 32, 16, 1)
    names = _names(build_variants(s, torch.float32, torch.device("cpu")))
    kernel_only = [n for n in names if n.endswith("kernel-only")]
    # 1layer-F128 has lean's φ; previous-default(-lm2pct, -cap1024, -window2) have default's: each φ is timed once
    # default-1layer-F64 (1 layer, F = 64, elu+1) is a fifth φ; default-1layer-F128 has lean's
    assert kernel_only == [f"ttr-{c} fused kernel-only" for c in ("default", "3layer-F256", "lean", "hedgehog-F64",
                                                                   "default-1layer-F64")]
    vs = build_variants(s, torch.float32, torch.device("cpu"))
    by = {v.name: v for v in vs}
    fused = [v for v in vs if v.family == "ttr" and " fused" in v.name and v.graph_of is None
             and not v.name.startswith("ttr-joint")]  # the joint configurations' bare joint-plan rows (in-kernel
    # and TMA-fed landmarks): no graph twin
    assert len(fused) == 5 * len(FUSED) + len(kernel_only)  # auto, guarded, flash-lm, sdpa-lm, tma-lm
    assert "ttr-joint fused" in by and "ttr-joint fused tma-lm" in by
    for v in fused:
        g = by[f"{v.name} graph"]
        assert g.graph_of == v.name and g.check_against == v.name and g.cost == v.cost
        assert "CUDA graphs need a CUDA device" in g.skip
        assert names.index(g.name) > names.index(v.name)  # the reference runs first
    assert by["sdpa[cudnn] graph"].family == "sdpa" and by["sdpa[cudnn] graph"].graph_of == "sdpa[cudnn]"
    assert not [n for n in _names(build_variants(s, torch.float32, torch.device("cpu"), graphs=False))
                if n.endswith(" graph")]


def test_only_and_configs_select():
    s = parse_shape("n=64:txt=16", 2, 32, 16, 1)
    cpu = torch.device("cpu")
    only = _names(build_variants(s, torch.float32, cpu, only=["cap1024"]))
    ttr = [n for n in only if n.startswith("ttr-")]
    assert ttr and all(n.startswith("ttr-previous-default-cap1024 ") for n in ttr)
    assert "sdpa[math]" in only and "sdpa[cudnn] graph" in only  # the baselines stay
    # a kept variant brings what it is checked against (fused row -> PyTorch path), unless it is skipped
    # (on CPU a graph row is, so it needs no fused row)
    chain = _names(build_variants(s, torch.float32, cpu, only=["hedgehog-F64 fused sdpa-lm"]))
    assert [n for n in chain if n.startswith("ttr-")] == ["ttr-hedgehog-F64 torch", "ttr-hedgehog-F64 fused sdpa-lm",
                                                           "ttr-hedgehog-F64 fused sdpa-lm graph"]
    alone = _names(build_variants(s, torch.float32, cpu, only=["hedgehog-F64 fused sdpa-lm graph"]))
    assert [n for n in alone if n.startswith("ttr-")] == ["ttr-hedgehog-F64 fused sdpa-lm graph"]
    picked = _names(build_variants(s, torch.float32, cpu, configs=["previous-default-cap1024", "hedgehog-F64"]))
    assert {n.split(" ")[0] for n in picked if n.startswith("ttr-")} == {"ttr-previous-default-cap1024",
                                                                         "ttr-hedgehog-F64"}
    assert "ttr-previous-default-cap1024 fused kernel-only" in picked  # first config with default's φ in this run
    with pytest.raises(ValueError, match="nope"):
        build_variants(s, torch.float32, cpu, configs=["nope"])


def test_every_config_runs_torch_path_and_graphs_skip_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--device", "cpu", "--sizes", "n=64:txt=16", "--dtypes", "fp32",
                 "--only", "torch,graph", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    for cfg in TTR_CONFIGS:
        r = rows[f"ttr-{cfg} torch"]
        assert r["skipped"] is None and r["ms"] > 0 and r["floor_ms"] > 0, r
    graph = [r for r in rows.values() if r["cuda_graph"]]
    # sdpa; per config the session row, and 5 fused where it has fused kernels; kernel-only (5 feature maps)
    assert len(graph) == 1 + len(TTR_CONFIGS) + 5 * len(FUSED) + 5
    assert all(r["skipped"].startswith("CUDA graphs need a CUDA device") for r in graph)


@pytest.mark.skipif(not INTERPRETED or HAS_CUDA, reason="needs triton's interpreter (CPU-only machine)")
def test_new_configs_fused_match_torch_path_in_interpreter(tmp_path):
    """Hedgehog F = 64 and the capped landmarks through the fused kernels (interpreter, fp32) agree with
    the PyTorch path of the same layer — which uses the landmark backend's own indices()."""
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--device", "cpu", "--sizes", "n=64:txt=16", "--dtypes", "fp32", "--no-graphs",
                 "--configs", "hedgehog-F64,previous-default-cap1024", "--only", "flash-lm,sdpa-lm,kernel-only",
                 "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    for cfg in ("hedgehog-F64", "previous-default-cap1024"):
        for impl in ("flash-lm", "sdpa-lm"):
            r = rows[f"ttr-{cfg} fused {impl}"]
            assert r["skipped"] is None and r["ms"] > 0, r
            assert r["rel_err_vs"] == f"ttr-{cfg} torch" and r["rel_err"] < 1e-5, r
        assert rows[f"ttr-{cfg} fused kernel-only"]["ms"] > 0


def test_window_config_carries_the_grid_and_costs_its_window():
    """previous-default-window2: the previous default layer with the landmark plugin's window r = 2; calls carry
    the Flux grid (side/16 per side), the floor counts the window keys, the SDPA-landmark row is timed too (cuDNN's
    log-sum-exp continued over the window) — also for the product default, which has the window."""
    from attnplug.bench.variants import _call, window_keys

    prev_t, prev_l = TTR_CONFIGS["previous-default"]
    assert TTR_CONFIGS["previous-default-window2"] == (prev_t, {**prev_l, "window": 2})
    s = parse_shape("1024", 24, 128, 512, 1)
    assert s.grid == (64, 64) and _call(s).latent_grid == (64, 64)
    assert window_keys(s, 2) == pytest.approx((64 * 5 - 6) ** 2 / s.n)  # 5 per axis, minus the clipped border
    vs = {v.name: v for v in build_variants(s, torch.bfloat16, torch.device("cpu"),
                                            configs=["default", "previous-default", "previous-default-window2"],
                                            graphs=False)}
    base, win = vs["ttr-previous-default torch"], vs["ttr-previous-default-window2 torch"]
    assert win.notes["n_landmarks"] == base.notes["n_landmarks"] and win.notes["window"] == 2
    assert win.cost[0] == pytest.approx(base.cost[0] + 4.0 * 24 * s.n * window_keys(s, 2) * 128)
    assert vs["ttr-default torch"].notes["window"] == 2
    for name in ("previous-default-window2", "default", "previous-default"):  # cuDNN landmarks serve a window too
        assert vs[f"ttr-{name} fused sdpa-lm"].skip is None and vs[f"ttr-{name} fused flash-lm"].skip is None
    assert parse_shape("n=64:txt=16", 2, 32, 16, 1).grid == (6, 8)


@pytest.mark.skipif(not INTERPRETED or HAS_CUDA, reason="needs triton's interpreter (CPU-only machine)")
def test_window_config_fused_matches_torch_path_in_interpreter(tmp_path):
    """`--configs default,previous-default-window2`: the window's fused rows (in-kernel softmax with the window, or
    SDPA landmarks continued over it; fp32) agree with the PyTorch row of the same layer, whose landmark branch applies the window on the call's
    grid — for the product default (window r = 2, 2 % landmarks) and the previous default with the window."""
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--device", "cpu", "--sizes", "n=64:txt=16", "--dtypes", "fp32", "--no-graphs",
                 "--configs", "default,previous-default-window2", "--only", "fused", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    for cfg in ("default", "previous-default-window2"):
        for name in ("fused", "fused guarded", "fused flash-lm", "fused sdpa-lm"):
            r = rows[f"ttr-{cfg} {name}"]
            assert r["skipped"] is None and r["ms"] > 0, r
            assert r["rel_err_vs"] == f"ttr-{cfg} torch" and r["rel_err"] < 1e-5, r


def test_speedups_graph_rows_against_graph_sdpa():
    def row(name, ms, graph=False, family="ttr"):
        return Result(name, family, "s", "bf16", 1, ms=ms, cuda_graph=graph,
                      notes={"graph_of": name[:-len(" graph")]} if graph else {})
    rows = [row("sdpa[cudnn]", 0.4, family="sdpa"), row("sdpa[math]", 2.0, family="sdpa"),
            row("sdpa[cudnn] graph", 0.38, True, "sdpa"), row("ttr fused", 0.8), row("ttr fused graph", 0.5, True)]
    _speedups(rows)
    by = {r.variant: r for r in rows}
    assert by["ttr fused"].speedup_vs_fastest_sdpa == pytest.approx(0.5)
    assert by["ttr fused"].speedup_baseline == "sdpa[cudnn]"
    assert by["ttr fused graph"].speedup_vs_fastest_sdpa == pytest.approx(0.38 / 0.5)
    assert by["ttr fused graph"].speedup_baseline == "sdpa[cudnn] graph"
    assert by["ttr fused graph"].notes["launch_overhead_ms"] == pytest.approx(0.3)
    assert by["sdpa[cudnn]"].speedup_vs_fastest_sdpa == pytest.approx(1.0)


def test_no_landmark_selection_twin_in_the_kernels():
    """Landmark positions come from the landmark plugin only (the twin picked other positions)."""
    assert not hasattr(kernels, "landmark_indices")
    assert not hasattr(kernels.reference, "landmark_indices")


def test_capture_graph_refuses_cpu():
    with pytest.raises(GraphCaptureError, match="CUDA device"):
        capture_graph(lambda: torch.zeros(1), torch.device("cpu"))


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_capture_graph_replays_and_reports_host_syncs():
    dev = torch.device("cuda")
    x = torch.randn(1, 2, 256, 64, device=dev, dtype=torch.bfloat16)
    eager = torch.nn.functional.scaled_dot_product_attention(x, x, x)
    replay = capture_graph(lambda: torch.nn.functional.scaled_dot_product_attention(x, x, x), dev)
    assert torch.equal(replay(), eager) and replay.peak_extra_bytes > 0

    def syncs():
        return x * x.sum().item()  # a host sync: not capturable

    with pytest.raises(GraphCaptureError, match="cannot capture"):
        capture_graph(syncs, dev)
    assert torch.equal(replay(), eager)  # a failed capture leaves the device usable


def test_the_joint_layer_is_timed_on_a_double_block_call_through_the_session(tmp_path):
    """`--configs joint`: the joint layer's product path (Session.attention on `double:0`) and its PyTorch row, checked
    against each other; the bare joint-plan row skips on a CPU."""
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--device", "cpu", "--sizes", "n=80:txt=16", "--dtypes", "fp32", "--configs", "joint",
                 "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    joint = sorted(n for n in rows if "ttr-joint" in n)
    assert joint == ["session ttr-joint", "session ttr-joint every-call", "session ttr-joint graph", "ttr-joint fused",
                     "ttr-joint fused tma-lm", "ttr-joint torch"]
    session = rows["session ttr-joint"]
    assert session["skipped"] is None and session["ms"] > 0
    assert session["rel_err"] is not None and session["rel_err"] < 1e-5, session
