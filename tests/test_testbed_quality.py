"""The quality sweep's variants: their configs validate, plans differ as documented, and the offline
fit (collect while sampling, then fit on the replay) and a landmark-window variant run end to end on
the testbed."""
from __future__ import annotations

import logging
from dataclasses import replace

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
#: (fraction, min, window), query_cap. The names are deltas from the baseline, the default before session 5;
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
    # the product default (session 5), trained like "default"
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
