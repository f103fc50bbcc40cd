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


def _tiny_study(tmp_path):
    """A tiny random testbed model, a ttr checkpoint with every layer ready, and a serving config: the paths."""
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
    return config, tmp_path / "ttr.safetensors", weights


def test_the_study_runs_end_to_end_and_writes_its_report(tmp_path):
    config, _, weights = _tiny_study(tmp_path)
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


def test_side_by_side_processes_train_both_policies_and_evaluate_as_one_process_does(tmp_path):
    """`--workers 2`: the two policies train in two processes (both files, both records), and the evaluation split
    over two processes gives the rows one process gives, in the same order, each seed's exact row once."""
    config, checkpoint, weights = _tiny_study(tmp_path)
    common = ["--config", str(config), "--checkpoint", str(checkpoint), "--weights", str(weights), "--steps", "2",
              "--prompts-per-episode", "1", "--no-progress"]
    trained = tmp_path / "trained"
    assert policy_study.main(["--out", str(trained), *common, "--calibration-prompts", "1", "--sigma-bands", "1,0",
                              "--calibration-layers", "single:0", "--updates", "1", "--pool", "2", "--no-evaluate",
                              "--workers", "2"]) == 0
    training = json.loads((trained / "training.json").read_text())
    assert [training[n]["updates"] for n in ("policy (text)", "policy (no text)")] == [1, 1]
    assert all("start_agreement" in training[n] and training[n]["history"] for n in training)
    rows = {}
    for workers in ("1", "2"):
        out = tmp_path / f"eval{workers}"
        assert policy_study.main(["--out", str(out), *common, "--eval-prompts", "2", "--seeds", "0,1", "--plan",
                                  str(trained / "plan.json"), "--policies", str(trained), "--plan-points", "1",
                                  "--thresholds", "0.5,1.0", "--workers", workers]) == 0
        rows[workers] = json.loads((out / "study.json").read_text())["rows"]
    key = [(r["seed"], r["method"], r["setting"]) for r in rows["1"]]
    assert key == [(r["seed"], r["method"], r["setting"]) for r in rows["2"]]
    assert [k for k in key if k[1] == "exact"] == [(0, "exact", "-"), (1, "exact", "-")]
    for one, two in zip(rows["1"], rows["2"]):
        assert one["share"] == two["share"]
        assert one.get("loss", 0.0) == pytest.approx(two.get("loss", 0.0), abs=1e-6)
