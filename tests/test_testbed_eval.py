"""`attnplug eval` on the committed distilled checkpoints reproduces the numbers their cards report."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "testbed" / "weights" / "ttr_default.safetensors"
SERVE_SINGLE = ROOT / "testbed" / "configs" / "serve_single.toml"
WINDOW_CHECKPOINT = ROOT / "testbed" / "weights" / "ttr_window.safetensors"
SERVE_WINDOW = ROOT / "testbed" / "configs" / "serve_single_window.toml"


def _eval_subset(config: Path, checkpoint: Path, tmp_path: Path) -> dict:
    """`attnplug eval` on one held-out prompt, 20 steps, CPU (the cards' "CPU subset"); its JSON."""
    from attnplug.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", "--config", str(config), "--checkpoint", str(checkpoint),
                                   "--prompts", "1", "--steps", "20", "--json", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def test_eval_reproduces_the_card_subset(tmp_path, one_thread):
    r = _eval_subset(SERVE_SINGLE, CHECKPOINT, tmp_path)
    # testbed/weights/TTR_CARD.md, "CPU subset"
    assert r["layers_served"] == [f"single:{i}" for i in range(6)]
    assert r["layers_ready"] == ["double:0", "double:1"] + [f"single:{i}" for i in range(6)]
    assert r["adherence_exact"] == 1.0
    assert abs(r["adherence_approx"] - 63 / 64) <= 1 / 64
    assert abs(r["velocity_cosine"] - 0.9389) < 3e-3
    assert abs(r["psnr_db"] - 16.5) < 1.0
    assert r["share_layers_served"] == 0.75
    fid = r["per_layer_fidelity"]
    assert sorted(fid) == [f"single:{i}" for i in range(6)]  # only served layers are measured
    assert all(0.8 < f["cosine"] < 1.0 and 0.0 < f["rel_l2"] < 0.6 for f in fid.values())


def test_eval_of_the_window_checkpoint_reproduces_its_card_subset(tmp_path, one_thread):
    """testbed/weights/TTR_WINDOW_CARD.md, "CPU subset": the landmark window lifts the weak layers."""
    r = _eval_subset(SERVE_WINDOW, WINDOW_CHECKPOINT, tmp_path)
    assert r["layers_served"] == [f"single:{i}" for i in range(6)]
    assert r["adherence_exact"] == 1.0 and r["adherence_approx"] == 1.0
    assert abs(r["velocity_cosine"] - 0.9883) < 3e-3
    assert abs(r["psnr_db"] - 22.6) < 1.0
    fid = r["per_layer_fidelity"]
    assert fid["single:1"]["cosine"] > 0.98 and fid["single:2"]["cosine"] > 0.975  # 0.94 / 0.93 without window
