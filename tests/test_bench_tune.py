"""`bench.tune`: each part's sweep and the closing whole-call comparison run the calls they name (CPU, no kernels).

The sweep's timing and the layer are replaced by stand-ins: what is checked is the plumbing (which call each
part times with which config), which a GPU run would otherwise be the first to exercise."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from attnplug.bench import tune
from attnplug.plugins.ttr.kernels import KernelConfig


class FakeLayer:
    """Records every whole-layer call `tune_size` makes: (landmark_impl, config)."""

    description = "fake layer"

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, KernelConfig]] = []
        self.k = self.v = torch.zeros(1)
        self.phi_k = SimpleNamespace()

    def fused(self, config: KernelConfig, landmark_impl: str | None):
        assert isinstance(config, KernelConfig), config
        return lambda: self.calls.append((landmark_impl, config))

    def joint(self, config: KernelConfig, landmark_impl: str):
        assert isinstance(config, KernelConfig), config
        return lambda: self.calls.append((f"joint {landmark_impl}", config))


def test_tune_size_sweeps_the_named_part_then_times_default_and_combined_whole_calls(monkeypatch, capsys):
    layer = FakeLayer()
    monkeypatch.setattr(tune, "default_layer", lambda size, dev: layer)
    # faster with a wider window block: the sweep must pick 128 as the part's best
    monkeypatch.setattr(tune, "time_ms", lambda fn, dev, *a: (fn(), [1.0 / layer.calls[-1][1].sdpa_lm_window_block])[1])
    grid = {"landmark-sdpa": {"sdpa_lm_window_block": [32, 128]}}
    summary = tune.tune_size("1024", False, torch.device("cpu"), ["landmark-sdpa"], grid)
    swept = [(impl, cfg.sdpa_lm_window_block) for impl, cfg in layer.calls[:2]]
    assert swept == [("sdpa", 32), ("sdpa", 128)]
    whole = [(impl, cfg.sdpa_lm_window_block) for impl, cfg in layer.calls[2:]]
    default_block = KernelConfig().sdpa_lm_window_block
    assert whole == [("fused", default_block), ("fused", 128), ("sdpa", default_block), ("sdpa", 128)]
    assert "BEST 1024 landmark-sdpa: 0.008 ms KernelConfig(sdpa_lm_window_block=128)" in summary
    assert "COMBINED 1024: KernelConfig(sdpa_lm_window_block=128)" in summary
    assert any(line.startswith("WHOLE 1024 sdpa-lm combined") for line in summary)


def test_the_joint_part_times_the_joint_layer_and_combines_apart_from_the_hybrid_parts(monkeypatch):
    layer = FakeLayer()
    monkeypatch.setattr(tune, "default_layer", lambda size, dev: layer)
    # faster with wider joint tiles, and with a narrower landmark window block
    monkeypatch.setattr(tune, "time_ms", lambda fn, dev, *a: (fn(), [
        (1.0 / layer.calls[-1][1].joint_block_m) if layer.calls[-1][0].startswith("joint")
        else float(layer.calls[-1][1].lm_window_block)])[1])
    grids = {"joint": {"joint_block_m": [32, 128]}, "landmark": {"lm_window_block": [32, 128]}}
    summary = tune.tune_size("2048", False, torch.device("cpu"), ["landmark", "joint"], grids)
    swept = [(impl, cfg.joint_block_m, cfg.lm_window_block) for impl, cfg in layer.calls[:4]]
    default = KernelConfig()
    assert swept == [("fused", default.joint_block_m, 32), ("fused", default.joint_block_m, 128),
                     ("joint fused", 32, default.lm_window_block), ("joint fused", 128, default.lm_window_block)]
    assert "COMBINED 2048: KernelConfig(lm_window_block=32)" in summary
    assert "COMBINED 2048 joint: KernelConfig(joint_block_m=128)" in summary
    whole_joint = [(impl, cfg.joint_block_m) for impl, cfg in layer.calls if impl.startswith("joint")][2:]
    assert whole_joint == [("joint fused", default.joint_block_m), ("joint fused", 128),
                           ("joint sdpa", default.joint_block_m), ("joint sdpa", 128)]
    assert any(line.startswith("WHOLE 2048 joint sdpa-lm combined") for line in summary)


def test_a_shard_calls_only_its_configs_once_each_untimed(monkeypatch):
    layer = FakeLayer()
    monkeypatch.setattr(tune, "default_layer", lambda size, dev: layer)
    monkeypatch.setattr(tune, "time_ms", lambda *a: (_ for _ in ()).throw(AssertionError("a shard must not time")))
    grid = {"landmark": {"lm_window_block": [16, 32, 64, 128]}}
    summary = tune.tune_size("1024", False, torch.device("cpu"), ["landmark"], grid, shard=(1, 2))
    assert [cfg.lm_window_block for _, cfg in layer.calls] == [32, 128]
    assert summary == []


def test_precompile_workers_get_the_same_sweep_less_the_precompile_option_each_with_its_shard(monkeypatch):
    started: list[list[str]] = []

    class Proc:
        returncode = 0

        def __init__(self, cmd, stdout=None):
            started.append(cmd[3:])

        def wait(self):
            return 0

    monkeypatch.setattr(tune.subprocess, "Popen", Proc)
    argv = ["--sizes", "2048", "--precompile", "3", "--parts", "landmark"]
    tune.precompile(tune.without_option(argv, "--precompile"), 3)
    assert started == [["--sizes", "2048", "--parts", "landmark", "--shard", f"{i}/3"] for i in range(3)]
    assert tune.without_option(["--precompile=4", "--quick"], "--precompile") == ["--quick"]
    assert tune.parse_shard("2/3") == (2, 3)
