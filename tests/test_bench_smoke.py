"""`attnplug bench` at CPU smoke sizes: it runs, times the SDPA math backend and the ttr variants,
computes ratios and floors, and writes JSON (CI speed: a few seconds)."""
from __future__ import annotations

import json

import pytest
import torch

from attnplug.bench.run import main, parse_shape
from attnplug.bench.variants import exact_cost, ttr_cost


def test_parse_shape_flux_and_custom():
    s = parse_shape("1024", 24, 128, 512, 1)
    assert (s.n, s.txt, s.h, s.d) == (4608, 512, 24, 128)
    assert parse_shape("2048", 24, 128, 512, 1).n == 16896 and parse_shape("4096", 24, 128, 512, 1).n == 66048
    c = parse_shape("n=5000:txt=256", 8, 64, 512, 2)
    assert (c.n, c.txt, c.b) == (5000, 256, 2)
    with pytest.raises(ValueError):
        parse_shape("1000", 24, 128, 512, 1)


def test_floor_counts():
    s = parse_shape("1024", 24, 128, 512, 1)
    flops, nbytes = exact_cost(s, torch.bfloat16)
    assert flops == 4 * 24 * 4608 ** 2 * 128 and nbytes == 4 * 24 * 4608 * 128 * 2
    f2, b2 = ttr_cost(s, torch.bfloat16, [(128, 128)], 128, 840)
    assert f2 == 24 * 4608 * (2 * 128 * 128 * 2 + 2 * 128 * 128 * 2 + 4 * 840 * 128) and b2 == nbytes


def test_smoke_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # one ttr configuration: the fused rows run in Triton's interpreter here (slow); tests/test_bench_variants.py
    # covers every configuration
    assert main(["--smoke", "--device", "cpu", "--sizes", "n=64:txt=16", "--configs", "default",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    math_row = rows["sdpa[math]"]
    assert math_row["ms"] > 0 and math_row["speedup_vs_fastest_sdpa"] == pytest.approx(1.0)
    assert rows["sdpa[cudnn]"]["skipped"]  # CUDA-only on a CPU run
    assert rows["ttr-default torch"]["ms"] > 0 and rows["ttr-default torch"]["floor_ms"] > 0
    assert "backend:sdpa" in rows and "backend:host" not in rows
    # the product path: Session.attention with a ready layer, the configuration's own defaults, a sampler step
    for name in ("session ttr-default", "session ttr-default every-call"):
        r = rows[name]
        assert r["skipped"] is None and r["ms"] > 0 and r["notes"]["product_path"], r
        assert r["rel_err_vs"] == "ttr-default torch" and r["rel_err"] < 1e-5, r
        assert r["notes"]["served_by"] == "pytorch" and r["notes"]["fallbacks"] == {}  # a CPU: the PyTorch path
    assert not any(r.startswith("ttr-seed") for r in rows)  # --configs default
    graph_rows = [r for r in report["results"] if r["cuda_graph"]]
    assert {r["variant"] for r in graph_rows} >= {"sdpa[cudnn] graph", "ttr-default fused graph",
                                                   "ttr-default fused kernel-only graph", "session ttr-default graph"}
    assert all("CUDA graphs need a CUDA device" in r["skipped"] for r in graph_rows)
    table = capsys.readouterr().out
    assert "sdpa[math]" in table and "ceilings" in table
    assert "product path" in table and "session ttr-default" in table.split("product path")[-1]


def test_bad_dtype_exits_2(capsys):
    assert main(["--smoke", "--device", "cpu", "--dtypes", "int8"]) == 2


def test_unknown_config_exits_2(capsys):
    assert main(["--smoke", "--device", "cpu", "--configs", "default,nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "previous-default-cap1024" in err
    # a former name gets its new name
    assert main(["--smoke", "--device", "cpu", "--configs", "default-window2"]) == 2
    assert "default-window2 → previous-default-window2" in capsys.readouterr().err


def test_kernel_config_sets_the_tiles_of_the_run_only(tmp_path, monkeypatch, capsys):
    """`--kernel-config` builds the run's plans with the given tiles (an A/B of one field in one process) and
    leaves the defaults to whatever runs after; a field that is not a tile is refused before anything runs."""
    from attnplug.plugins.ttr.kernels import serve_plan, tiles

    seen: list = []
    real_init = serve_plan.ServePlan.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append(self.config)
    monkeypatch.setattr(serve_plan.ServePlan, "__init__", spy)
    assert main(["--smoke", "--device", "cpu", "--sizes", "n=64:txt=16", "--configs", "default", "--only", "fused",
                 "--no-graphs", "--kernel-config", '{"lm_direct": 2, "lm_block": 32}']) == 0
    assert seen and all(c.lm_direct == 2 and c.lm_block == 32 for c in seen)
    assert tiles.active_config() is tiles.DEFAULT_CONFIG
    for bad, named in (('{"lm_dirct": 2}', "lm_dirct"), ('{"lm_direct": "2"}', "lm_direct"), ("[2]", "object")):
        assert main(["--smoke", "--device", "cpu", "--kernel-config", bad]) == 2
        assert named in capsys.readouterr().err
