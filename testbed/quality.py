"""The quality sweep behind docs/QUALITY.md: distill several layer configs online, evaluate each.

`python -m attnplug.testbed.quality --out DIR --device cuda` distills every variant of `VARIANTS`
with the same plan (prompts, noise, seed), then evaluates the resulting checkpoint on held-out
prompts several ways (every ready layer; single blocks only; all but the first double block), and
writes `DIR/<variant>/metrics.json` plus `DIR/quality.json` and `DIR/quality.md` (the table).
Variants run in order until the time budget is spent, so the first ones are the most important.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.config import read_config_file
from ..plugins.landmark.settings import PREVIOUS_DEFAULTS as LANDMARK_PREVIOUS
from ..plugins.landmark.settings import LandmarkSettings
from ..plugins.ttr.settings import PREVIOUS_DEFAULTS as TTR_PREVIOUS
from ..plugins.ttr.settings import TtrSettings
from .demo import DEMO_CONFIG, DemoPlan, run_demo
from .evaluate import evaluate, strip_images


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` deep-merged into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass(frozen=True)
class Variant:
    """One row of the sweep: config overrides (deep-merged into the base) and how its plan differs.

    `decay_over_plan`: set the cosine lr schedule to decay over the layer updates the plan makes
    (runs × steps: every layer trains on every step). `runs`: sampling runs instead of the plan's;
    `fit_updates`: updates per layer on the replay after sampling (the offline fit)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    runs_factor: float = 1.0
    runs: int | None = None
    fit_updates: int = 0
    decay_over_plan: bool = False

    def plan(self, base: DemoPlan) -> DemoPlan:
        runs = self.runs if self.runs is not None else max(1, round(base.runs * self.runs_factor))
        return replace(base, runs=runs, fit_updates=self.fit_updates)

    def config(self, base: dict[str, Any], plan: DemoPlan) -> dict[str, Any]:
        cfg = merge(base, self.overrides)
        if self.decay_over_plan:
            cfg = merge(cfg, {"plugins": {"distill": {"lr_schedule": "cosine",
                                                      "lr_decay_updates": plan.runs * plan.steps}}})
        return cfg


#: The layer every variant is a delta from: the product default before session 5 (α_max 0.2, landmarks 8 %
#: / at least 64, no window), pinned, so that "default", "all queries", "window r2 + α_max 0.5", … keep
#: meaning the layers docs/QUALITY.md measured under those names.
BASELINE = {"plugins": {"ttr": dict(TTR_PREVIOUS), "landmark": dict(LANDMARK_PREVIOUS)}}

#: The product default (session 5) as overrides of the baseline, read from the settings' own defaults so
#: that it cannot drift from them (every field the baseline pins).
PRODUCT_DEFAULT = {"plugins": {
    "ttr": TtrSettings().model_dump(include=set(TTR_PREVIOUS)),
    "landmark": LandmarkSettings().model_dump(include=set(LANDMARK_PREVIOUS))}}

_COSINE = {"plugins": {"distill": {"lr_schedule": "cosine", "lr_min_ratio": 0.05}}}
#: The offline baseline of MEASUREMENTS.md: collect 32 prompts × 20 steps of attention per layer (no
#: training while sampling), then 1500 updates per layer on it, 512 queries, cosine decay to zero.
_OFFLINE = {"plugins": {"distill": {
    "train_steps_per_call": 0, "replay_per_layer": 640, "replay_max_mb": 6144.0, "replay_offload_cpu": False,
    "query_cap": 512, "lr_schedule": "cosine", "lr_decay_updates": 1500, "lr_min_ratio": 0.0}}}

#: Train on every query (the testbed has 1088 tokens) instead of a subsample. The window rows of
#: docs/QUALITY.md were measured this way, before the distiller passed a subsample's positions to the
#: landmark branch (it does now); "all queries" is the window's control.
_ALL_QUERIES = {"plugins": {"distill": {"query_cap": 4096}}}


#: 2 % of the image tokens as landmarks (at least 16) instead of 8 % (at least 64).
_LM_2PCT = {"plugins": {"landmark": {"fraction": 0.02, "min": 16}}}


def _window(radius: int, ttr: dict[str, Any] | None = None) -> dict[str, Any]:
    """Overrides of a landmark-window variant: window radius `radius`, every query trained, `ttr` overrides."""
    over = merge(_ALL_QUERIES, {"plugins": {"landmark": {"window": radius}}})
    return merge(over, {"plugins": {"ttr": ttr}}) if ttr else over


#: name → variant (names without commas: `--variants` is a comma list). The base trains every layer;
#: readiness decides.
VARIANTS: dict[str, Variant] = {
    "default": Variant(),
    "cosine lr": Variant(_COSINE, decay_over_plan=True),
    "cosine lr 2× runs": Variant(_COSINE, runs_factor=2.0, decay_over_plan=True),
    "offline fit": Variant(_OFFLINE, runs=4, fit_updates=1500),
    "kernel-only": Variant({"plugins": {"ttr": {"landmark": False}}}),
    "1-layer F64 hedgehog": Variant({"plugins": {"ttr": {"depth": 1, "feature_dim": 64, "activation": "hedgehog"}}}),
    "1-layer F128 elu+1": Variant({"plugins": {"ttr": {"depth": 1, "feature_dim": 128}}}),
    "landmarks 2 %": Variant(_LM_2PCT),
    "per-head φ": Variant({"plugins": {"ttr": {"per_head": True}}}),
    "F256 + cosine lr": Variant(merge(_COSINE, {"plugins": {"ttr": {"feature_dim": 256}}}), decay_over_plan=True),
    "α_max 0.5 + cosine lr": Variant(merge(_COSINE, {"plugins": {"ttr": {"alpha_max": 0.5}}}), decay_over_plan=True),
    "α_max 0.5": Variant({"plugins": {"ttr": {"alpha_max": 0.5}}}),
    "α_max 1 + cosine lr": Variant(merge(_COSINE, {"plugins": {"ttr": {"alpha_max": 1.0}}}), decay_over_plan=True),
    # the landmark branch plus a local window (QUALITY.md: single:1/2 attend locally)
    "all queries": Variant(_ALL_QUERIES),
    "window r2": Variant(_window(2)),
    "window r1": Variant(_window(1)),
    "window r4": Variant(_window(4)),
    "window r2 + α_max 0.5": Variant(_window(2, {"alpha_max": 0.5})),
    "window r2 + α_max 1": Variant(_window(2, {"alpha_max": 1.0})),
    "window r4 + α_max 0.5": Variant(_window(4, {"alpha_max": 0.5})),
    # with the window carrying the local part, can the kernel branch and the landmarks get lighter (speed)?
    "window r2 + α_max 0.5 + 1-layer F128": Variant(_window(2, {"alpha_max": 0.5, "depth": 1})),
    "window r2 + α_max 0.5 + hidden 128": Variant(_window(2, {"alpha_max": 0.5, "hidden": 128})),
    "window r2 + α_max 0.5 + landmarks 2 %": Variant(merge(_window(2, {"alpha_max": 0.5}), _LM_2PCT)),
    "window r2 + α_max 0.5 + lean": Variant(merge(_window(2, {"alpha_max": 0.5, "depth": 1}), _LM_2PCT)),
    # the default query subsample (256 of 1088), its positions handed to the window
    "window r2 + α_max 0.5 + query subsample": Variant({"plugins": {"landmark": {"window": 2},
                                                                   "ttr": {"alpha_max": 0.5}}}),
    # the product default since session 5 (window r2, α_max 0.5, 2 % landmarks), trained like "default"
    # (the demo's query subsample, its positions handed to the window)
    "product default": Variant(PRODUCT_DEFAULT),
}

#: Ways to serve a distilled checkpoint: name → config overlay (its gates, and runtime settings such as how
#: adaptive α normalises d); readiness always applies on top.
_SINGLE = {"kind": "layers", "include": ["single:*"]}
SERVING: dict[str, dict[str, Any]] = {
    "all ready": {"gates": []},
    "single blocks": {"gates": [_SINGLE]},
    "single blocks from step 2": {"gates": [_SINGLE, {"kind": "step_window", "steps": ["2:"]}]},
    "all but double:0": {"gates": [{"kind": "layers", "exclude": ["double:0"]}]},
    # the same checkpoint, α's d normalised by the running mean kept while distilling (one fused pass)
    "single blocks + running α": {"gates": [_SINGLE], "plugins": {"ttr": {"alpha_reference": "running"}}},
}


def base_config() -> dict[str, Any]:
    """The demo config, widened to train every layer (double and single blocks), on the `BASELINE` layer."""
    cfg = merge(read_config_file(DEMO_CONFIG), BASELINE)
    cfg["gates"] = []
    cfg["plugins"]["distill"]["layers"] = ["*"]
    cfg["plugins"]["distill"]["min_swap_layers"] = 8
    cfg["loggers"] = [{"kind": "console", "every": 200, "scopes": ["distill"]}]
    return cfg


def run(out: Path, device: str, plan: DemoPlan, variants: list[str], budget_s: float,
        layers: list[str] | None = None, serving: list[str] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Distill and evaluate each variant in turn; stops starting new ones when the budget is spent.

    `layers`: train only these layer patterns (default: every layer); `serving`: names of `SERVING`;
    `seed`: training prompts, noise and the held-out evaluation set (another seed = an independent repeat)."""
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in variants:
        if time.perf_counter() - t0 > budget_s:
            print(f"[quality] budget spent; skipping {name}", flush=True)
            continue
        variant = VARIANTS[name]
        vplan = variant.plan(plan)
        base = base_config()
        if layers:
            # every eligible layer trains on every step (the selector clamps min to the eligible count)
            base["plugins"]["distill"].update(layers=layers, min_swap_layers=10_000, max_swap_layers=-1)
        cfg = variant.config(base, vplan)
        metrics = run_demo(out / folder_name(name), device=device, config=cfg, plan=vplan, progress=False,
                           seed=seed)
        row = {"variant": name, "seed": seed, "plan": vplan.__dict__, "distill": metrics["distill"], "serving": {}}
        for serve, overlay in SERVING.items():
            if serving and serve not in serving:
                continue
            res = strip_images(evaluate(merge(cfg, overlay), out / folder_name(name) / "ttr.safetensors",
                                        n_prompts=plan.eval_prompts, steps=plan.eval_steps, device=device,
                                        seed=seed))
            row["serving"][serve] = res
            print(f"[quality] {name} / {serve}: served {len(res['layers_served'])}/{len(res['layers'])} "
                  f"adherence {100 * res['adherence_exact']:.2f} -> {100 * res['adherence_approx']:.2f} "
                  f"vcos {res['velocity_cosine']:.3f} psnr {res['psnr_db']:.1f}", flush=True)
        rows.append(row)
        (out / "quality.json").write_text(json.dumps(rows, indent=2))
        (out / "quality.md").write_text(table(rows))
    return rows


def folder_name(variant: str) -> str:
    """A file-system name of a variant: letters, digits, '.', '_' and '-' only."""
    text = variant.replace("%", "pct").replace("φ", "phi").replace("×", "x").replace("α", "alpha").replace("+", "and")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | seed | serving | ready | served | adherence exact → approx | drop, points | velocity cos | PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for serve, r in row["serving"].items():
            lines.append(f"| {row['variant']} | {row.get('seed', 0)} | {serve} | {len(r['layers_ready'])}/{len(r['layers'])} | "
                         f"{len(r['layers_served'])}/{len(r['layers'])} ({', '.join(r['layers_served'])}) | "
                         f"{100 * r['adherence_exact']:.2f} → {100 * r['adherence_approx']:.2f} | "
                         f"{r['adherence_drop_points']:+.2f} | {r['velocity_cosine']:.3f} | {r['psnr_db']:.1f} |")
    return "\n".join(lines) + "\n"


def collect(out: Path) -> list[dict[str, Any]]:
    """Merge the `quality.json` of every sub-folder of `out` (variants run in parallel processes) into
    `out/quality.json` and `out/quality.md`, in the order of `VARIANTS`."""
    rows = [row for path in sorted(out.glob("*/quality.json")) for row in json.loads(path.read_text())]
    order = {name: i for i, name in enumerate(VARIANTS)}
    rows.sort(key=lambda r: order.get(r["variant"], len(order)))
    (out / "quality.json").write_text(json.dumps(rows, indent=2))
    (out / "quality.md").write_text(table(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--prompts-per-run", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="Comma list of variants (default: all, in this order): "
                         + "; ".join(VARIANTS).replace("%", "%%"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="Start no new variant after this many seconds.")
    ap.add_argument("--layers", default="", help="Comma list of layer patterns to train (default: all).")
    ap.add_argument("--serving", default="", help=f"Comma list of servings to evaluate (default: all of {list(SERVING)}).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of training prompts, noise and held-out set.")
    ap.add_argument("--collect", action="store_true",
                    help="Only merge OUT/*/quality.json (variants run as separate processes) into OUT.")
    a = ap.parse_args(argv)
    if a.collect:
        print(table(collect(a.out)))
        return 0
    unknown = [v for v in a.variants.split(",") if v.strip() and v.strip() not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    plan = DemoPlan(runs=a.runs, prompts_per_run=a.prompts_per_run, steps=a.steps, eval_prompts=a.eval_prompts,
                    eval_steps=a.eval_steps)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    bad = [x for x in split(a.serving) if x not in SERVING]
    if bad:
        ap.error(f"--serving: unknown {bad}; known: {list(SERVING)}")
    run(a.out, a.device, plan, split(a.variants), a.budget_s, split(a.layers), split(a.serving), a.seed)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
