"""The testbed registry, `--testbed` on the commands, training a registry testbed, resolution transfer and First
Block Cache composition — on tiny models (CPU, seconds)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from attnplug.cli import app
from attnplug.core.checkpoint import CheckpointError
from attnplug.testbed import registry, train
from attnplug.testbed.model import TestbedConfig, TestbedModel, load_testbed
from attnplug.testbed.transfer import check_fits, checkpoint_layers, serving

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "testbed" / "configs" / "serve_single.toml"
TTR_DEFAULT = ROOT / "testbed" / "weights" / "ttr_default.safetensors"


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A registry testbed 'tiny' (the family's architecture, 2x2 cells: 64 image tokens), untrained weights."""
    torch.manual_seed(0)
    weights = tmp_path / "tiny" / "testbed.safetensors"
    TestbedModel(TestbedConfig(grid=2)).save(weights)
    bed = registry.Testbed("tiny", TestbedConfig(grid=2), weights,
                           registry.TrainRecipe(steps=2, batch=2, lr=1e-4, eval_prompts=1,
                                                eval_batch=1), "none", "2x2 cells")
    monkeypatch.setitem(registry.TESTBEDS, "tiny", bed)
    return bed


def test_registry_sizes_and_the_default_is_unchanged():
    beds = registry.TESTBEDS
    assert [beds[n].image_tokens for n in ("default", "grid64", "grid128")] == [1024, 4096, 16384]
    assert [beds[n].latent_side for n in ("default", "grid64", "grid128")] == [32, 64, 128]
    assert [beds[n].cond_tokens for n in ("default", "grid64", "grid128")] == [64, 256, 1024]
    assert beds["default"].config == TestbedConfig() and beds["default"].weights == registry.WEIGHTS_DIR / "testbed.safetensors"
    for bed in beds.values():  # one layer family: a ttr checkpoint of one loads on another
        assert bed.config.layer_keys() == TestbedConfig().layer_keys()
        assert (bed.config.num_attention_heads, bed.config.attention_head_dim) == (4, 32)
        assert bed.recipe.minutes <= 8  # the training loop leaves time for the evaluation in a 10-minute call
    assert registry.get_testbed(None) is beds["default"]
    with pytest.raises(ValueError, match="unknown testbed 'nope'; known: default, grid64, grid128"):
        registry.get_testbed("nope")


def test_missing_weights_say_how_to_train_them(tmp_path):
    bed = replace(registry.TESTBEDS["grid64"], weights=tmp_path / "none.safetensors")
    with pytest.raises(registry.TestbedMissing, match="train it with: python -m attnplug.testbed.train --testbed "
                                                      "grid64 --out OUT --device cuda --minutes 7"):
        bed.load()


@pytest.mark.parametrize("command", ["eval", "demo", "calibrate"])
def test_testbed_option_errors_are_one_line(command, monkeypatch, tmp_path):
    monkeypatch.setitem(registry.TESTBEDS, "grid64",
                        replace(registry.TESTBEDS["grid64"], weights=tmp_path / "absent.safetensors"))
    base = {"eval": ["eval", "--config", str(SERVE)], "demo": ["demo", "--quick", "--out", str(tmp_path / "d")],
            "calibrate": ["calibrate", "--config", str(SERVE), "--checkpoint", str(TTR_DEFAULT), "--out",
                          str(tmp_path / "c")]}[command]
    res = _run(*base, "--testbed", "grid64")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "train it with: python -m attnplug.testbed.train" in res.stderr
    res = _run(*base, "--testbed", "nope")
    assert res.exit_code == 2 and "unknown testbed 'nope'" in res.stderr, res.output


def test_eval_refuses_a_bad_step_cache_in_one_line():
    res = _run("eval", "--config", str(SERVE), "--step-cache", "fbcache:-1")
    assert res.exit_code == 2 and "THRESHOLD must be a positive number" in res.stderr, res.output


def test_train_a_registry_testbed_from_another_model(tiny, tmp_path):
    src = tmp_path / "src.safetensors"
    torch.manual_seed(1)
    TestbedModel(TestbedConfig(grid=1)).save(src)
    args = train.parse_args(["--testbed", "tiny", "--out", str(tmp_path / "out"), "--init-from", str(src),
                             "--log-every", "1", "--eval-steps", "1", "--device", "cpu", "--no-subset-eval"])
    assert (args.grid, args.steps, args.batch, args.lr, args.eval_prompts) == (2, 2, 2, 1e-4, 1)
    rec = train.train(args)
    assert rec["training"]["testbed"] == "tiny" and rec["training"]["init_from"] == str(src)
    m = TestbedModel.load(tmp_path / "out" / train.WEIGHTS_NAME)
    assert m.cfg.grid == 2 and m.meta["dtype"] == "float16"
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "`tiny`" in card and "2x2 mosaics" in card and "--testbed tiny" in card


def test_init_from_copies_the_transformer_and_averages_the_cells(tmp_path):
    torch.manual_seed(2)
    src = TestbedModel(TestbedConfig(grid=1))
    path = src.save(tmp_path / "s.safetensors")
    loaded = TestbedModel.load(path)
    model = TestbedModel(TestbedConfig(grid=2))
    train.init_from(model, str(path))
    for a, b in zip(model.transformer.state_dict().values(), loaded.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.allclose(model.cond.cell_emb.weight, loaded.cond.cell_emb.weight.mean(0).expand(4, -1))
    with pytest.raises(ValueError, match="another architecture"):
        train.init_from(TestbedModel(TestbedConfig(grid=1, num_single_layers=1)), str(path))


def test_parse_args_keeps_the_default_recipe_and_refuses_a_conflicting_grid():
    a = train.parse_args(["--out", "x"])
    assert (a.steps, a.batch, a.lr, a.grid, a.init_from, a.time_budget_s, a.warmup) == (6000, 128, 3e-4, 8, None, 0.0, 0.3)
    a = train.parse_args(["--out", "x", "--testbed", "grid128", "--minutes", "5"])
    assert (a.grid, a.time_budget_s, a.ema) == (32, 300.0, 0.995)
    assert a.init_from == ("grid64" if registry.TESTBEDS["grid64"].weights.is_file() else "default")
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--testbed", "grid64", "--grid", "8"])


def test_check_fits_refuses_another_family(tmp_path):
    layers = checkpoint_layers(TTR_DEFAULT)
    assert layers and all((m["heads"], m["head_dim"]) == (4, 32) for m in layers.values())
    check_fits(TTR_DEFAULT, registry.TESTBEDS["grid128"].config)
    with pytest.raises(CheckpointError, match="distilled for 4 heads x 32, .* has 2 x 16"):
        check_fits(TTR_DEFAULT, TestbedConfig(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6)))
    with pytest.raises(CheckpointError, match=r"do not exist in .*1 double \+ 1 single"):
        check_fits(TTR_DEFAULT, TestbedConfig(num_layers=1, num_single_layers=1))
    with pytest.raises(ValueError, match="alpha_reference"):
        serving("mean")


def _serve_config(alpha: str) -> dict:
    from attnplug.core.config import read_config_file
    from attnplug.testbed.quality import merge

    # the tiny testbed's random transformer is another model than the one the checkpoint was distilled on
    return merge(read_config_file(SERVE), {"plugins": {"ttr": {"alpha_reference": alpha}}, "other_model": "serve"})


@pytest.mark.parametrize("alpha", ["call", "running"])
def test_transfer_serves_a_checkpoint_of_another_size(tiny, alpha):
    from attnplug.testbed.evaluate import evaluate

    res = evaluate(_serve_config(alpha), TTR_DEFAULT, n_prompts=1, steps=2, testbed="tiny")
    assert res["testbed"] == "tiny" and res["image_tokens"] == 64
    assert res["layers_served"] == [f"single:{i}" for i in range(6)]
    assert res["images"]["approx"].shape == (1, 1, 16, 16)


def test_transfer_serves_the_layers_its_config_serves(tiny):
    """With the all-layer checkpoint's own config, transfer serves every layer, joint blocks too (not only the
    single blocks that `distill` trains), both α references."""
    from attnplug.core.config import read_config_file
    from attnplug.testbed.transfer import cross_evaluate

    all_layers = ROOT / "testbed" / "weights" / "ttr_all_layers.safetensors"
    config = read_config_file(ROOT / "testbed" / "configs" / "serve_all_layers.toml")
    rows = cross_evaluate({"default": all_layers}, ["tiny"], n_prompts=1, steps=2, device="cpu", seed=0,
                          config=config)
    assert [r["alpha_reference"] for r in rows] == ["call", "running"]
    assert all(len(r["layers_served"]) == 8 and r["served_on"] == "tiny" for r in rows)


def test_a_checkpoint_of_another_model_is_withheld(tiny, caplog):
    """The committed checkpoint records the default testbed's transformer; on another transformer (the tiny
    testbed's) every layer is served exact, and the log says why."""
    import logging

    from attnplug.core.config import read_config_file
    from attnplug.testbed.evaluate import evaluate

    with caplog.at_level(logging.WARNING, logger="attnplug"):
        res = evaluate(read_config_file(SERVE), TTR_DEFAULT, n_prompts=1, steps=2, testbed="tiny")
    assert res["layers_served"] == []
    assert "8 layer(s) were distilled on another model" in caplog.text and "serving them exact" in caplog.text


def test_step_cache_composes_with_ttr_and_counts_skipped_steps(tiny):
    pytest.importorskip("diffusers.hooks", reason="diffusers without hooks")
    from attnplug.testbed.evaluate import evaluate
    from attnplug.testbed.step_cache import StepCachedModel, available

    if available():
        pytest.skip(available())
    steps = 4
    res = evaluate(_serve_config("call"), TTR_DEFAULT, n_prompts=2, steps=steps, testbed="tiny", batch_size=1,
                   step_cache="fbcache:1e6")  # every step after a trajectory's first is skipped
    sc = res["step_cache"]
    assert (sc["steps"], sc["skipped"], sc["trajectories"]) == (2 * steps, 2 * (steps - 1), 2)
    assert res["layers_served"] == [f"single:{i}" for i in range(6)]  # served on the computed steps
    # a threshold of ~0 never skips, and taking the cache off leaves the model as it was
    model = load_testbed(testbed="tiny")
    from attnplug.testbed import data, sampling

    prompts = data.train_prompts(1, 2)
    ref = sampling.sample(model, prompts, steps=3)
    cached = StepCachedModel(model, "fbcache:1e-12")
    assert torch.equal(sampling.sample(cached, prompts, steps=3), ref) and cached.report()["skipped"] == 0
    cached.remove()
    assert torch.equal(sampling.sample(model, prompts, steps=3), ref)
    assert json.dumps(cached.report())


def test_quality_sweep_runs_on_a_registry_testbed(tiny, tmp_path):
    from attnplug.bench.variants import TTR_CONFIGS
    from attnplug.testbed.demo import DemoPlan
    from attnplug.testbed.quality import BENCH_CONFIG, LARGE_VARIANTS, VARIANTS, run

    assert set(LARGE_VARIANTS) <= set(VARIANTS) and set(BENCH_CONFIG.values()) <= set(TTR_CONFIGS)
    assert set(LARGE_VARIANTS) | {"product default"} == set(BENCH_CONFIG)
    plan = DemoPlan(runs=1, prompts_per_run=1, steps=2, eval_prompts=1, eval_steps=2)
    rows = run(tmp_path / "q", "cpu", plan, ["product default + landmarks max 128"], 1e9, ["single:0"],
               ["single blocks"], testbed="tiny")
    assert rows[0]["testbed"] == "tiny" and rows[0]["serving"]["single blocks"]["testbed"] == "tiny"
    assert rows[0]["config"]["plugins"]["landmark"]["max"] == 128
    assert "(tiny)" in (tmp_path / "q" / "quality.md").read_text()


def test_transfer_command_evaluates_both_alpha_references_and_collects(tiny, tmp_path):
    from attnplug.testbed import transfer

    out = tmp_path / "t" / "from_default"
    rc = transfer.main(["--out", str(out), "--testbeds", "tiny", "--checkpoints", f"default={TTR_DEFAULT}",
                        "--config", str(SERVE), "--device", "cpu", "--eval-prompts", "1", "--steps", "2"])
    assert rc == 0
    rows = json.loads((out / "transfer.json").read_text())
    assert [(r["distilled_on"], r["served_on"], r["alpha_reference"]) for r in rows] == [
        ("default", "tiny", "call"), ("default", "tiny", "running")]
    assert transfer.main(["--out", str(tmp_path / "t"), "--collect"]) == 0
    assert "| default | tiny | running |" in (tmp_path / "t" / "transfer.md").read_text()
    assert transfer.main(["--out", str(out), "--testbeds", "nope", "--checkpoints", f"default={TTR_DEFAULT}"]) == 2


def test_step_cache_table_and_spec():
    from attnplug.testbed import step_cache

    assert str(step_cache.parse_step_cache("fbcache:0.10")) == "fbcache:0.1"
    for bad in ("fbcache", "teacache:0.1", "fbcache:x", "fbcache:0", "fbcache:inf"):
        with pytest.raises(step_cache.StepCacheError):
            step_cache.parse_step_cache(bad)
    row = {"testbed": "grid64", "seed": 1, "n_prompts": 32, "backend": "host", "adherence_exact": 0.99, "adherence_approx": 0.98,
           "adherence_drop_points": 1.0, "velocity_cosine": 1.0,
           "step_cache": {"spec": "fbcache:0.1", "steps": 20, "skipped": 5, "share_skipped": 0.25,
                          "step_speedup_bound": 20 / 15}}
    text = step_cache.table([row, {**row, "step_cache": None}])
    assert "| grid64 | 1 | 32 | host | fbcache:0.1 | 99.00 → 98.00 | +1.00 | 5/20 (25 %) | 1.33× |" in text
    assert "| none |" in text


@pytest.mark.skipif(not registry.TESTBEDS["grid64"].weights.is_file(), reason="grid64 weights not committed")
@pytest.mark.parametrize("name,tokens,prompts,steps", [("grid64", 4096, 2, 8), ("grid128", 16384, 1, 4)])
def test_committed_large_testbed_loads_at_its_grid_and_follows_held_out_prompts(name, tokens, prompts, steps):
    """`--testbed NAME` works from a fresh checkout: the committed fp16 file is the registry's model at its grid
    and, sampled in fp32 on a CPU (few prompts and steps: 16 384 tokens are slow there), draws the digits its
    held-out prompts ask for."""
    from attnplug.testbed.train import evaluate_adherence

    bed = registry.get_testbed(name)
    model = bed.load()
    assert model.cfg == bed.config and bed.image_tokens == tokens
    ev = evaluate_adherence(model, prompts, steps, grid=bed.config.grid, batch_size=1)
    assert ev["cells"] == prompts * bed.config.grid ** 2 and ev["adherence"] >= 0.99
