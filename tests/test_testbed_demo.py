"""`attnplug demo` end to end in its reduced mode: distill, save, evaluate, write the report."""
from __future__ import annotations

import json


def test_demo_quick_writes_a_complete_report(tmp_path, one_thread):
    from typer.testing import CliRunner

    from attnplug.cli import app
    from attnplug.core.checkpoint import load_checkpoint

    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "Distilled online for 2 sampling runs" in res.output and "Prompt adherence: exact" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    d, e = metrics["distill"], metrics["eval"]
    assert d["trained_layers"] == [f"single:{i}" for i in range(6)]  # the demo config trains single blocks
    assert d["updates"] == sum(d["updates_per_layer"].values()) > 0
    assert set(e["layers"]) == {"double:0", "double:1"} | {f"single:{i}" for i in range(6)}
    assert 0.0 <= e["adherence_approx"] <= 1.0 and e["adherence_exact"] > 0.9
    assert (out / "samples.png").stat().st_size > 1000 and (out / "distill.png").stat().st_size > 1000
    assert any(json.loads(line).get("scope") == "distill/layer" for line in (out / "distill.jsonl").open())
    comps = load_checkpoint(out / "ttr.safetensors")
    assert {"backend.ttr", "distiller.ttr"} <= set(comps)
