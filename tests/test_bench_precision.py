"""`bench.precision`: the paired testbed measurement of `feature_precision` evaluates one checkpoint per seed every
way (φ in fp32 / in the input dtype on the PyTorch path, the fused path, the fp32 model), the same prompts and noise,
and writes what it measured. The testbed evaluation itself is stubbed here (it runs on the GPU)."""
from __future__ import annotations

import json

import torch

from attnplug.bench import precision
from attnplug.core.config import load_config
from attnplug.plugins.ttr.settings import TtrSettings


def test_every_way_on_the_same_checkpoint_and_seed(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_evaluate(config, checkpoint, *, n_prompts, steps, seed, device, dtype):
        cfg = load_config(config)  # the overlay is a valid config
        ttr = cfg.section("ttr")
        seen.append((seed, str(checkpoint), ttr.kernel, ttr.feature_precision, dtype, n_prompts))
        return {"layers": ["single:0", "double:0"], "layers_served": ["single:0"], "adherence_exact": 0.99,
                "adherence_approx": 0.98, "adherence_drop_points": 1.0, "velocity_cosine": 0.999, "psnr_db": 30.0,
                "seconds_per_step_approx": 0.01, "dtype": str(dtype).removeprefix("torch."), "images": {}}

    monkeypatch.setattr("attnplug.testbed.evaluate.evaluate", fake_evaluate)
    assert precision.main(["--out", str(tmp_path), "--device", "cpu", "--seeds", "0,1", "--prompts", "4"]) == 0
    default = TtrSettings().feature_precision  # the fused way and the fp32 model keep the default
    ckpt = str(precision.Path(precision.__file__).resolve().parent.parent / precision.COMMITTED[1])
    for seed in (0, 1):
        assert [s[1:] for s in seen if s[0] == seed] == [
            (ckpt, "torch", "float32", torch.bfloat16, 4), (ckpt, "torch", "input", torch.bfloat16, 4),
            (ckpt, "auto", default, torch.bfloat16, 4), (ckpt, "auto", default, torch.float32, 4)]
    rows = json.loads((tmp_path / "precision.json").read_text())
    assert [(r["seed"], r["way"]) for r in rows] == [(s, w) for s in (0, 1) for w in (*precision.WAYS, "fp32 model")]
    assert "| 1 | input | bfloat16 | 1/2 |" in (tmp_path / "precision.md").read_text()
    assert "images" not in rows[0]
