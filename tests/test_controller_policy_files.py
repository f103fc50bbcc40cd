"""Policy files: round trip, resume with optimizer/baseline/λ, wrong layer sets refused, atomic saves; the CLI."""
from __future__ import annotations


import pytest
import torch
from typer.testing import CliRunner

from attnplug.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from attnplug.core.config import ConfigError
from attnplug.plugins.controller.policy import RoutingPolicy
from attnplug.plugins.controller.policy_checkpoint import (POLICY_COMPONENT, PolicyLayersError, TrainingState,
                                                           load_policy, save_policy)

LAYERS = ["double:0", "single:0", "single:1"]


def _trained(path, text_dim=4):
    policy = RoutingPolicy(LAYERS, text_dim, hidden=8)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    policy(torch.randn(3, 10), torch.randn(3, text_dim)).sum().backward()
    opt.step()
    from attnplug.plugins.controller.policy_checkpoint import flatten_optimizer

    state = TrainingState(flatten_optimizer(opt), baseline=-0.25, reward_scale=0.5, lagrange=2.5, updates=7,
                          episodes=28)
    save_policy(path, policy, {"lr": 0.01}, state)
    return policy, opt


def test_round_trip_keeps_weights_settings_and_training_state(tmp_path):
    path = tmp_path / "p.safetensors"
    policy, opt = _trained(path)
    loaded = load_policy(path, layers=list(reversed(LAYERS)))  # the same set in another order is fine
    assert loaded.policy.layers == LAYERS and loaded.policy.use_text and loaded.policy.text_dim == 4
    for (k, a), b in zip(policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), k
    t = loaded.training
    assert (t.baseline, t.reward_scale, t.lagrange, t.updates, t.episodes) == (-0.25, 0.5, 2.5, 7, 28)
    assert loaded.settings == {"lr": 0.01}
    from attnplug.plugins.controller.policy_checkpoint import restore_optimizer

    fresh = torch.optim.AdamW(loaded.policy.parameters(), lr=1e-2)
    restore_optimizer(fresh, t.optimizer, "test")
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    ablation = tmp_path / "n.safetensors"
    save_policy(ablation, RoutingPolicy(LAYERS, None, use_text=False))
    assert not load_policy(ablation).policy.use_text and load_policy(ablation).training is None


def test_a_policy_for_another_layer_set_is_refused_naming_the_file_and_both_sets(tmp_path):
    path = tmp_path / "p.safetensors"
    _trained(path)
    with pytest.raises(PolicyLayersError) as info:
        load_policy(path, layers=["double:0", "single:0", "single:1", "single:2"])
    assert isinstance(info.value, ConfigError)
    text = str(info.value)
    assert str(path) in text and "single:2" in text and "3 layers" in text and "this model has 4" in text


def test_broken_files_are_refused_with_the_field(tmp_path):
    path = tmp_path / "p.safetensors"
    _trained(path)
    comps = load_checkpoint(path)
    tensors, meta = comps[POLICY_COMPONENT]
    bad = dict(meta, architecture=dict(meta["architecture"], hidden=16))
    save_checkpoint(tmp_path / "b.safetensors", {POLICY_COMPONENT: (tensors, bad)})
    with pytest.raises(CheckpointError, match="do not fit its architecture"):
        load_policy(tmp_path / "b.safetensors")
    save_checkpoint(tmp_path / "c.safetensors", {"backend.ttr": ({}, {})})
    with pytest.raises(CheckpointError, match="not a routing policy"):
        load_policy(tmp_path / "c.safetensors")
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
    save_checkpoint(tmp_path / "d.safetensors", {POLICY_COMPONENT: (nan, meta)})
    with pytest.raises(CheckpointError, match="not finite|non-finite|NaN"):
        load_policy(tmp_path / "d.safetensors")


def test_a_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    _trained(path)
    before = path.read_bytes()
    import attnplug.core.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_policy(path, RoutingPolicy(LAYERS))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temp file left


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    from attnplug.cli import app

    runner = CliRunner()
    ckpt = tmp_path / "k.safetensors"
    ckpt.write_bytes(b"x")
    cfg = tmp_path / "c.toml"
    cfg.write_text('backend = "ttr"\n')
    cases = [
        (["--config", str(cfg), "--checkpoint", str(ckpt)], "give --minutes, --updates or both"),
        (["--config", str(cfg), "--checkpoint", str(ckpt), "--updates", "0"], "--updates 0"),
        (["--config", str(cfg), "--checkpoint", str(tmp_path / "no"), "--updates", "1"], "no checkpoint file"),
        (["--config", str(cfg), "--checkpoint", str(ckpt), "--minutes", "-1"], "--minutes -1"),
        (["--config", str(cfg), "--checkpoint", str(ckpt), "--updates", "1", "--out", str(tmp_path)], "is a folder"),
        (["--config", str(cfg), "--checkpoint", str(ckpt), "--updates", "1", "--resume", str(tmp_path / "r")],
         "no policy file"),
        (["--config", str(cfg), "--checkpoint", str(ckpt), "--updates", "1"], "not a readable safetensors"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--config", str(cfg), "--checkpoint", str(ckpt), "--updates", "1", "--device", "cuda"],
                      "CUDA is not available"))
    for args, expected in cases:
        result = runner.invoke(app, ["controller", "train", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("attnplug controller train:") and expected in lines[0], \
            (args, result.output)
