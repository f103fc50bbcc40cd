"""The quality sweep's variants: their configs validate, plans differ as documented, and the offline
fit (collect while sampling, then fit on the replay) and a landmark-window variant run end to end on
the testbed."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from attnplug.core.config import load_config
from attnplug.plugins.landmark.backend import LandmarkBackend
from attnplug.testbed.demo import DemoPlan, run_demo
from attnplug.testbed.quality import SERVING, VARIANTS, base_config, merge


def test_every_variant_and_serving_config_validates():
    # `--variants` is a comma list and the device script's QUALITY_VARIANTS a ';' list
    assert not [n for n in [*VARIANTS, *SERVING] if "," in n or ";" in n], "names must not contain ',' or ';'"
    plan = DemoPlan(runs=60, steps=20)
    for name, variant in VARIANTS.items():
        vplan = variant.plan(plan)
        cfg = variant.config(base_config(), vplan)
        for overlay in SERVING.values():
            load_config(merge(cfg, overlay))  # raises ConfigError naming the field
    cos = VARIANTS["cosine lr"].config(base_config(), plan)["plugins"]["distill"]
    assert cos["lr_schedule"] == "cosine" and cos["lr_decay_updates"] == 60 * 20
    longer = VARIANTS["cosine lr 2× runs"]
    assert longer.plan(plan).runs == 120
    assert longer.config(base_config(), longer.plan(plan))["plugins"]["distill"]["lr_decay_updates"] == 2400
    off = VARIANTS["offline fit"].plan(replace(plan, prompts_per_run=8))
    assert off.runs * off.prompts_per_run == 32 and off.fit_updates == 1500


def test_offline_fit_collects_then_fits(tmp_path, one_thread):
    plan = replace(DemoPlan.quick(), fit_updates=3)
    cfg = VARIANTS["offline fit"].config(base_config(), plan)
    cfg["plugins"]["distill"]["query_cap"] = 32
    metrics = run_demo(tmp_path / "off", config=cfg, plan=plan, progress=False)
    per_layer = metrics["distill"]["updates_per_layer"]
    assert len(per_layer) == 8 and set(per_layer.values()) == {3}, per_layer
    assert metrics["distill"]["updates"] == 24


def test_window_variant_trains_through_the_window(tmp_path, one_thread, monkeypatch, caplog):
    """The distiller trains on every query, the host reports the grid: the window is used, never dropped."""
    windows: list[tuple[int, int]] = []
    table = LandmarkBackend.window_table

    def spy(self, grid, n_cond, device):
        windows.append(grid)
        return table(self, grid, n_cond, device)

    monkeypatch.setattr(LandmarkBackend, "window_table", spy)
    plan = replace(DemoPlan.quick(), runs=1, steps=2)
    variant = VARIANTS["window r2"]
    cfg = variant.config(base_config(), variant.plan(plan))
    assert cfg["plugins"]["landmark"]["window"] == 2
    cfg["plugins"]["distill"]["layers"] = ["single:1"]
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        metrics = run_demo(tmp_path / "window", config=cfg, plan=variant.plan(plan), progress=False)
    assert metrics["distill"]["updates_per_layer"] == {"single:1": 2}
    assert windows and set(windows) == {(32, 32)}
    assert not [r.getMessage() for r in caplog.records if "landmark" in r.getMessage()]


@pytest.mark.parametrize("name", ["window r1", "window r4", "window r2 + α_max 0.5"])
def test_window_variants_set_the_window(name):
    cfg = VARIANTS[name].config(base_config(), DemoPlan())
    assert cfg["plugins"]["landmark"]["window"] == int(name.split()[1][1])
    assert cfg["plugins"]["distill"]["query_cap"] >= 1088
    assert cfg["plugins"].get("ttr", {}).get("alpha_max", 0.2) == (0.5 if "α_max" in name else 0.2)


#: Effective settings of some variants, as docs/QUALITY.md measured them — (α_max, depth, landmark on),
#: (fraction, min, window), query_cap. The names are deltas from the baseline, the previous default;
#: a new product default must not move them.
EFFECTIVE = {
    "default": ((0.2, 2, True), (0.08, 64, 0), 256),
    "all queries": ((0.2, 2, True), (0.08, 64, 0), 4096),
    "kernel-only": ((0.2, 2, False), (0.08, 64, 0), 256),
    "landmarks 2 %": ((0.2, 2, True), (0.02, 16, 0), 256),
    "α_max 0.5": ((0.5, 2, True), (0.08, 64, 0), 256),
    "window r2": ((0.2, 2, True), (0.08, 64, 2), 4096),
    "window r2 + α_max 0.5": ((0.5, 2, True), (0.08, 64, 2), 4096),
    "window r2 + α_max 0.5 + landmarks 2 %": ((0.5, 2, True), (0.02, 16, 2), 4096),
    "window r2 + α_max 0.5 + lean": ((0.5, 1, True), (0.02, 16, 2), 4096),
    "window r2 + α_max 0.5 + query subsample": ((0.5, 2, True), (0.08, 64, 2), 256),
    # the product default, trained like "default"
    "product default": ((0.5, 2, True), (0.02, 16, 2), 256),
}


@pytest.mark.parametrize("name", sorted(EFFECTIVE))
def test_variants_keep_their_effective_settings(name):
    cfg = load_config(VARIANTS[name].config(base_config(), DemoPlan()))
    t, lm, d = cfg.section("ttr"), cfg.section("landmark"), cfg.section("distill")
    got = ((t.alpha_max, t.depth, t.landmark), (lm.fraction, lm.min, lm.window), d.query_cap)
    assert got == EFFECTIVE[name]
    assert (t.hidden, t.feature_dim, t.activation, lm.max, lm.layout) == (256, 128, "elu+1", 0, "even")


def test_product_default_variant_follows_the_settings_defaults():
    from attnplug.plugins.landmark.settings import LandmarkSettings
    from attnplug.plugins.ttr.settings import TtrSettings

    cfg = load_config(VARIANTS["product default"].config(base_config(), DemoPlan()))
    assert cfg.section("ttr").alpha_max == TtrSettings().alpha_max
    assert cfg.section("landmark") == LandmarkSettings()


# ---- the joint-layer sweep: layer-effect servings, the effect table, keeping the best checkpoint ------------------
def test_layer_effect_servings_cover_each_layer_alone_and_cumulatively():
    from attnplug.testbed.quality import EFFECT_ORDER, SERVING_GROUPS, expand_servings

    names = expand_servings(["all ready", "layer effects", "double blocks"])
    assert names[0] == "all ready" and len(names) == 1 + 2 * len(EFFECT_ORDER) + 1 and len(set(names)) == len(names)
    assert set(SERVING_GROUPS["layer effects"]) <= set(SERVING)
    assert SERVING["only single:2"] == {"gates": [{"kind": "layers", "include": ["single:2"]}]}
    assert SERVING["cumulative to single:1"]["gates"][0]["include"] == ["double:0", "double:1", "single:0",
                                                                         "single:1"]
    # cumulative rows that are other servings share their overlay: evaluated once
    assert SERVING["cumulative to double:0"] == SERVING["only double:0"]
    assert SERVING["cumulative to double:1"] == SERVING["double blocks"]
    assert SERVING["cumulative to single:5"] == SERVING["all ready"]
    for name in ("hybrid everywhere", "joint shared", "joint blend"):
        assert set(expand_servings(VARIANTS[name].servings)) <= set(SERVING)


def test_joint_variants_put_the_joint_layer_on_the_double_blocks_only():
    for name, combine in (("joint shared", "shared"), ("joint blend", "blend")):
        t = load_config(VARIANTS[name].config(base_config(), DemoPlan())).section("ttr")
        assert [t.variant_for(f"double:{i}") for i in range(2)] == ["joint", "joint"]
        assert {t.variant_for(f"single:{i}") for i in range(6)} == {"hybrid"} and t.joint.combine == combine
    hybrid = load_config(VARIANTS["hybrid everywhere"].config(base_config(), DemoPlan())).section("ttr")
    assert hybrid.joint_layers == []


def _row(variant: str, seed: int, drop: float, checkpoint: str) -> dict:
    from attnplug.testbed.quality import EFFECT_ORDER

    res = lambda d: {"adherence_drop_points": d, "adherence_exact": 1.0, "adherence_approx": 1 - d / 100,  # noqa: E731
                     "n_prompts": 64, "velocity_cosine": 0.99, "psnr_db": 20.0, "layers": [], "layers_ready": [],
                     "layers_served": []}
    serving = {"all ready": res(drop), **{f"only {k}": res(0.1 * i) for i, k in enumerate(EFFECT_ORDER)},
               **{f"cumulative to {k}": res(0.2 * i) for i, k in enumerate(EFFECT_ORDER)}}
    return {"variant": variant, "seed": seed, "serving": serving, "checkpoint": checkpoint,
            "config": VARIANTS[variant].config(base_config(), DemoPlan())}


def test_effect_table_and_keep_best_write_a_config_that_serves_the_checkpoint(tmp_path):
    from attnplug.testbed.quality import effects_table, keep_best

    files = {}
    for name in ("joint shared", "joint blend"):
        for seed in (0, 1):
            files[name, seed] = tmp_path / f"{name.replace(' ', '_')}_{seed}.safetensors"
            files[name, seed].write_bytes(f"{name} {seed}".encode())
    rows = [_row("hybrid everywhere", 0, 9.0, ""), _row("joint shared", 0, 0.9, str(files["joint shared", 0])),
            _row("joint shared", 1, 0.5, str(files["joint shared", 1])),
            _row("joint blend", 0, 0.3, str(files["joint blend", 0])),
            _row("joint blend", 1, 2.0, str(files["joint blend", 1]))]
    text = effects_table(rows)
    assert "#### hybrid everywhere" in text and "| single:3 | +0.50 | +1.00 |" in text
    assert "alone, seed 0 | cumulative, seed 0 | alone, seed 1 | cumulative, seed 1" in text
    best = keep_best(rows, tmp_path / "out")
    assert best is not None and (best["variant"], best["seed"]) == ("joint shared", 0)  # mean 0.7 < 1.15
    assert (tmp_path / "out" / "ttr_all_layers.safetensors").read_bytes() == b"joint shared 0"
    written = (tmp_path / "out" / "serve_all_layers.toml")
    cfg = load_config(written)
    assert cfg.root.backend == "ttr" and cfg.root.gates == [] and not cfg.root.training
    assert cfg.section("ttr").joint_layers == ["double:*"] and cfg.section("ttr").joint.combine == "shared"
    committed = load_config(Path(__file__).resolve().parents[1] / "testbed" / "configs" / "serve_all_layers.toml")
    assert committed.section("ttr") == cfg.section("ttr") and committed.section("landmark") == cfg.section("landmark")
    assert keep_best([rows[0]], tmp_path / "none") is None


@pytest.mark.slow
def test_servings_of_one_checkpoint_share_the_exact_pass_and_equal_separate_evaluations(tmp_path, one_thread,
                                                                                         monkeypatch):
    from attnplug.testbed.evaluate import evaluate, strip_images
    from attnplug.testbed.quality import Variant, run

    lenient = merge(VARIANTS["joint shared"].overrides, {"plugins": {"distill": {
        "readiness_min_updates": 1, "readiness_threshold": 1.0, "layers": ["double:*"], "query_cap": 64}}})
    monkeypatch.setitem(VARIANTS, "joint shared", Variant(lenient))
    plan = DemoPlan(runs=1, prompts_per_run=1, steps=2, eval_prompts=1, eval_steps=2)
    serving = ["double blocks", "cumulative to double:1", "only double:0"]
    rows = run(tmp_path, "cpu", plan, ["joint shared"], 1e9, serving=serving, eval_workers=2)  # two spawned workers
    (row,) = rows
    assert list(row["serving"]) == serving
    assert row["serving"]["only double:0"]["layers_served"] == ["double:0"]
    assert row["serving"]["cumulative to double:1"] is row["serving"]["double blocks"]
    cfg = merge(row["config"], SERVING["only double:0"])
    alone = strip_images(evaluate(cfg, row["checkpoint"], n_prompts=1, steps=2, device="cpu"))
    shared = row["serving"]["only double:0"]
    for key in ("adherence_exact", "adherence_approx", "velocity_cosine", "psnr_db", "layers_served",
                "per_layer_fidelity"):
        assert alone[key] == shared[key], key
    assert (tmp_path / "effects.md").exists() and json.loads((tmp_path / "quality.json").read_text())[0]["serving"]


def test_a_distill_phase_then_an_evaluate_phase_equal_one_run(tmp_path, one_thread, monkeypatch):
    """The sweep split over two time-limited GPU calls: the first distils, the second evaluates what it left."""
    from attnplug.testbed.quality import Variant, run

    lenient = merge(VARIANTS["joint shared"].overrides, {"plugins": {"distill": {
        "readiness_min_updates": 1, "readiness_threshold": 1.0, "layers": ["double:*"], "query_cap": 64}}})
    monkeypatch.setitem(VARIANTS, "joint shared", Variant(lenient))
    plan = DemoPlan(runs=1, prompts_per_run=1, steps=2, eval_prompts=1, eval_steps=2)
    serving = ["double blocks"]
    with pytest.raises(FileNotFoundError, match="run the distill phase"):
        run(tmp_path / "none", "cpu", plan, ["joint shared"], 1e9, serving=serving, phase="evaluate")
    (distilled,) = run(tmp_path / "split", "cpu", plan, ["joint shared"], 1e9, serving=serving, phase="distill")
    assert distilled["serving"] == {} and Path(distilled["checkpoint"]).is_file()
    (evaluated,) = run(tmp_path / "split", "cpu", plan, ["joint shared"], 1e9, serving=serving, phase="evaluate")
    assert evaluated["distill"] == distilled["distill"]
    (whole,) = run(tmp_path / "whole", "cpu", plan, ["joint shared"], 1e9, serving=serving)
    for key in ("adherence_exact", "adherence_approx", "layers_served"):
        assert evaluated["serving"]["double blocks"][key] == whole["serving"]["double blocks"][key], key
