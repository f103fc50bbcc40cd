"""The quality sweep's variants: their configs validate, plans differ as documented, and the offline
fit (collect while sampling, then fit on the replay) runs end to end on the testbed."""
from __future__ import annotations

from dataclasses import replace

from attnplug.core.config import load_config
from attnplug.testbed.demo import DemoPlan, run_demo
from attnplug.testbed.quality import SERVING, VARIANTS, base_config, merge


def test_every_variant_and_serving_config_validates():
    plan = DemoPlan(runs=60, steps=20)
    for name, variant in VARIANTS.items():
        vplan = variant.plan(plan)
        cfg = variant.config(base_config(), vplan)
        for gates in SERVING.values():
            load_config(merge(cfg, {"gates": gates}))  # raises ConfigError naming the field
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
