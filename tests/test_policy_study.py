"""The routing-policy study end to end on a CPU, on a tiny random testbed model (numbers are not meaningful)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from attnplug.core import LayerSpec, Session, save_checkpoint
from attnplug.testbed import policy_study
from attnplug.testbed.model import TestbedConfig, TestbedModel

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_TTR = {"feature_dim": 16, "depth": 1, "hidden": 0, "key_chunk": 64, "query_chunk": 64}


def test_the_study_runs_end_to_end_and_writes_its_report(tmp_path):
    cfg = TestbedConfig(grid=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
                        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    weights = TestbedModel(cfg).save(tmp_path / "tiny.safetensors")
    session = Session({"backend": "ttr", "plugins": {"ttr": TINY_TTR}})
    backend = session.primary
    for key in cfg.layer_keys():
        backend.layer(LayerSpec(key, 2, 16))
        backend.ready[key] = True
    save_checkpoint(tmp_path / "ttr.safetensors", {"backend.ttr": backend.state()})
    session.close()
    config = tmp_path / "serve.toml"
    config.write_text('backend = "ttr"\nexact = "host"\n[[loggers]]\nkind = "console"\nscopes = []\n'
                      '[plugins.ttr]\nfeature_dim = 16\ndepth = 1\nhidden = 0\n'
                      '[plugins.controller.calibration]\nterms = [{ kind = "testbed_adherence", max = 0.5 }]\n'
                      '[plugins.controller.policy_training]\nepisodes_per_update = 1\n'
                      'terms = [{ kind = "testbed_adherence", max = 0.5 }, { kind = "velocity_fidelity", max = 0.05 }]\n')
    out = tmp_path / "study"
    code = policy_study.main(["--out", str(out), "--config", str(config), "--checkpoint", str(tmp_path / "ttr.safetensors"),
                              "--weights", str(weights), "--steps", "2", "--eval-prompts", "2", "--seeds", "0,1",
                              "--calibration-prompts", "1", "--sigma-bands", "1,0", "--calibration-layers",
                              "single:0", "--plan-points", "2", "--updates", "2", "--prompts-per-episode", "1",
                              "--pool", "2", "--thresholds", "0.5,1.0", "--no-progress"])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"study.json", "study.md", "pareto.png", "policy_text.safetensors",
                                                "policy_no_text.safetensors"}
    result = json.loads((out / "study.json").read_text())
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"exact", "plan", "policy (text)", "policy (no text)"}
    assert {r["seed"] for r in result["rows"]} == {0, 1}
    assert all(0.0 <= r["share"] <= 1.0 for r in result["rows"])
    nothing = [r for r in result["rows"] if r["setting"] == "threshold 1"]
    assert nothing and all(r["share"] == 0.0 for r in nothing)  # threshold 1: the policy serves nothing
    assert result["policies"]["policy (text)"]["updates"] == 2
    assert "dominates the plan" in (out / "study.md").read_text()

    # an earlier study's plan and policies are evaluated again without calibrating or training
    again = tmp_path / "again"
    code = policy_study.main(["--out", str(again), "--config", str(config), "--checkpoint",
                              str(tmp_path / "ttr.safetensors"), "--weights", str(weights), "--steps", "2",
                              "--eval-prompts", "2", "--seeds", "0", "--plan", str(out / "plan.json"),
                              "--policies", str(out), "--plan-points", "1", "--thresholds", "1.0", "--no-progress"])
    assert code == 0
    reread = json.loads((again / "study.json").read_text())
    assert reread["policies"]["policy (text)"]["updates"] == 2  # read back from the file, not trained again
    # the training seconds and the last update's metrics come from that study's training.json
    assert reread["policies"]["policy (text)"]["seconds"] == result["policies"]["policy (text)"]["seconds"] is not None
    assert "share_served" in reread["policies"]["policy (no text)"]["last"]
    assert not (again / "policy_text.safetensors").exists()

    # trained further from those files in another call, without evaluating: its folder holds the next call's inputs
    more = tmp_path / "more"
    code = policy_study.main(["--out", str(more), "--config", str(config), "--checkpoint",
                              str(tmp_path / "ttr.safetensors"), "--weights", str(weights), "--steps", "2",
                              "--plan", str(out / "plan.json"), "--resume", str(out), "--updates", "1",
                              "--prompts-per-episode", "1", "--pool", "2", "--no-evaluate", "--no-progress",
                              "--training", "entropy=0.05", "--training",
                              'terms=[{"kind": "testbed_adherence", "max": 1.0}]'])
    assert code == 0
    assert {p.name for p in more.iterdir()} == {"plan.json", "training.json", "policy_text.safetensors",
                                                 "policy_no_text.safetensors"}
    training = json.loads((more / "training.json").read_text())
    assert training["policy (text)"]["updates"] == 3  # two before, one here: the optimizer state went on
    assert len(training["policy (no text)"]["history"]) == 1 and "share_served" in training["policy (no text)"]["history"][0]
    from attnplug.plugins.controller.policy_checkpoint import load_policy
    trained_with = load_policy(more / "policy_text.safetensors").settings  # the overrides are what it trained with
    assert trained_with["entropy"] == 0.05 and trained_with["terms"][0]["max"] == 1.0
    with pytest.raises(SystemExit, match="entropy"):  # an override the settings refuse names its field
        policy_study.main(["--out", str(more), "--config", str(config), "--checkpoint", str(tmp_path / "ttr.safetensors"),
                           "--weights", str(weights), "--steps", "2", "--plan", str(out / "plan.json"), "--updates", "1",
                           "--no-evaluate", "--no-progress", "--training", "entropy=-1"])
    with pytest.raises(SystemExit, match="FIELD=JSON"):
        policy_study.training_overrides(["entropy"])
    with pytest.raises(SystemExit, match="not both"):
        policy_study.main(["--out", str(more), "--resume", str(out), "--policies", str(out)])
