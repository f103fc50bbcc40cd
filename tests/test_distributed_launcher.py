"""The multi-GPU launcher (`bench/multi_gpu.py`) on gloo CPU processes: its torchrun jobs — the sharded layer and
the transformer forward under diffusers' context parallelism (Ulysses) with ttr serving the single blocks — run on
2 ranks at tiny shapes and write their JSON; the summary computes the speedups and the targets."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from distributed_helpers import need_gloo  # noqa: E402

from attnplug.bench.multi_gpu import LAYER_TARGET, jobs, main, summarize  # noqa: E402


def test_two_rank_smoke_writes_the_layer_and_forward_reports(tmp_path: Path) -> None:
    need_gloo()
    pytest.importorskip("diffusers")
    assert main(["--gpus", "2", "--smoke", "--out", str(tmp_path)]) == 0
    layer = json.loads((tmp_path / "layer-2.json").read_text())
    assert layer["world"] == 2 and layer["comm_ms"] > 0 and layer["path"] == "sharded (PyTorch path)"
    model = json.loads((tmp_path / "model-2.json").read_text())
    assert model["parallel"] == {"kind": "ulysses", "world": 2, "attention_backend": "native"}
    rows = {r["mode"]: r for r in model["results"]}
    assert rows["native"]["served_per_forward"] == {}  # diffusers' own context-parallel attention
    assert rows["ttr-100"]["served_layers"]["ttr"] == "single:0-1" and not rows["ttr-100"]["fallbacks"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == [] and summary["model"]["2"]["ttr_vs_native"] > 0
    assert "NCCL_NVLS_ENABLE=0" not in (tmp_path / "layer-2.log").read_text()  # set in the env, not the command


def test_summary_speedups_and_targets(tmp_path: Path) -> None:
    for n, ms in ((1, 40.0), (2, 21.0), (4, 10.0)):
        (tmp_path / f"layer-{n}.json").write_text(json.dumps({"layer_ms": ms, "comm_ms": 0.5 * (n > 1),
                                                              "path": "fused"}))
    (tmp_path / "model-4.json").write_text(json.dumps({"parallel": {"world": 4}, "results": [
        {"mode": "native", "ms": 900.0}, {"mode": "ttr-100", "ms": 600.0}]}))
    s = summarize(tmp_path, [1, 2, 4])
    assert s["layer"][4]["speedup_vs_1"] == 4.0 and s["targets"]["layer_met"] is (4.0 >= LAYER_TARGET)
    assert s["targets"]["forward_4_gpus_ttr_vs_native"] == 1.5 and s["targets"]["forward_met"] is True
    assert s["model"][1] is None and s["model"][2] is None
    names = [(name, n) for name, n, _, _ in jobs([1, 2, 4], 4096, tmp_path, False, "ring")]
    assert names == [("layer-1", 1), ("layer-2", 2), ("layer-4", 4), ("model-1", 1), ("model-2", 2), ("model-4", 4)]
    model_4 = jobs([4], 4096, tmp_path, False, "ring")[1][3]
    assert model_4[model_4.index("--context-parallel") + 1] == "ring" and "native,ttr-100" in model_4
