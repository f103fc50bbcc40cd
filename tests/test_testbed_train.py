"""Testbed training script: LR schedule, noise levels, and a tiny end-to-end run on the CPU."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from attnplug.testbed import train
from attnplug.testbed.model import TestbedModel


def test_one_cycle_follows_torch_shape():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=200, anneal_strategy="cos",
                                                cycle_momentum=False)
    ours = [train.one_cycle_lr(i, 200, 3e-4) for i in range(200)]
    theirs = []
    for _ in range(200):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # same shape; our phases end one step later than torch's
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1.5e-2 * 3e-4
    assert ours[0] == pytest.approx(theirs[0]) and ours[-1] < 1e-7
    assert max(ours) == pytest.approx(3e-4)


def test_sigma_sampling():
    g = torch.Generator().manual_seed(0)
    s = train.sample_sigmas(20000, g, torch.device("cpu"))
    assert 0 < float(s.min()) and float(s.max()) < 1 and abs(float(s.median()) - 0.5) < 0.02
    assert float(((s < 0.1) | (s > 0.9)).float().mean()) < 0.05  # logit-normal: few extremes
    with pytest.raises(ValueError, match="sigma-sampling"):
        train.sample_sigmas(2, g, torch.device("cpu"), "beta")


def test_tiny_training_run_writes_weights_card_and_config(tmp_path):
    args = train.parse_args(["--out", str(tmp_path), "--steps", "3", "--batch", "2", "--log-every", "1",
                             "--eval-prompts", "1", "--eval-steps", "1", "--device", "cpu", "--no-subset-eval"])
    rec = train.train(args)
    assert rec["training"]["steps"] == 3 and len(rec["loss_curve"]) == 3
    assert all(torch.isfinite(torch.tensor(l)) for _, l in rec["loss_curve"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["command"] == "python -m attnplug.testbed.train " + " ".join(args.argv)
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "final loss" in card and "Exact training command" in card
    m = TestbedModel.load(tmp_path / train.WEIGHTS_NAME)
    assert m.meta["training"]["steps"] == 3 and m.meta["dtype"] == "float16"
