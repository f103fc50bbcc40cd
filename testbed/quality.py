"""The quality sweep behind docs/QUALITY.md: distill several layer configs online, evaluate each.

`python -m attnplug.testbed.quality --out DIR --device cuda` distills every variant of `VARIANTS`
with the same plan (prompts, noise, seed), then evaluates the resulting checkpoint on held-out
prompts several ways (every ready layer; single blocks only; all but the first double block), and
writes `DIR/<variant>/metrics.json` plus `DIR/quality.json` and `DIR/quality.md` (the table).
Variants run in order until the time budget is spent, so the first ones are the most important.

The layer-effect servings (`--serving "layer effects"`: each layer served alone, and cumulatively in
`EFFECT_ORDER`) give the per-layer table (`effects.md`); servings with the same config overlay are
evaluated once, and every serving of one checkpoint shares one exact pass (`evaluate(reference=)`).
`--collect --keep-best DIR` merges parallel processes' rows and copies the all-layer checkpoint of the
best joint variant with its serving config into DIR. `--testbed NAME` runs the sweep on another testbed of the
registry (`testbed/registry.py`: `grid64`, 4 096 image tokens; `grid128`, 16 384); `LARGE_VARIANTS` are the
points of the speed-vs-quality front measured there, each timed by `attnplug bench --configs` under the name
`BENCH_CONFIG` gives it.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.config import read_config_file
from ..plugins.landmark.settings import PREVIOUS_DEFAULTS as LANDMARK_PREVIOUS
from ..plugins.landmark.settings import LandmarkSettings
from ..plugins.ttr.settings import PREVIOUS_DEFAULTS as TTR_PREVIOUS
from ..plugins.ttr.joint_settings import JointSettings
from ..plugins.ttr.settings import TtrSettings
from .demo import DEMO_CONFIG, DemoPlan, run_demo
from .evaluate import evaluate, strip_images
from .processes import run_side_by_side


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
    #: the servings evaluated when `--serving` names none (None: `DEFAULT_SERVING`)
    servings: tuple[str, ...] | None = None

    def plan(self, base: DemoPlan) -> DemoPlan:
        runs = self.runs if self.runs is not None else max(1, round(base.runs * self.runs_factor))
        return replace(base, runs=runs, fit_updates=self.fit_updates)

    def config(self, base: dict[str, Any], plan: DemoPlan) -> dict[str, Any]:
        cfg = merge(base, self.overrides)
        if self.decay_over_plan:
            cfg = merge(cfg, {"plugins": {"distill": {"lr_schedule": "cosine",
                                                      "lr_decay_updates": plan.runs * plan.steps}}})
        return cfg


#: The layer every variant is a delta from: the previous product default (α_max 0.2, landmarks 8 %
#: / at least 64, no window), pinned, so that "default", "all queries", "window r2 + α_max 0.5", … keep
#: meaning the layers docs/QUALITY.md measured under those names.
BASELINE = {"plugins": {"ttr": dict(TTR_PREVIOUS), "landmark": dict(LANDMARK_PREVIOUS)}}

#: The product default as overrides of the baseline, read from the settings' own defaults so
#: that it cannot drift from them (every field the baseline pins).
PRODUCT_DEFAULT = {"plugins": {
    "ttr": TtrSettings().model_dump(include=set(TTR_PREVIOUS)),
    "landmark": LandmarkSettings().model_dump(include=set(LANDMARK_PREVIOUS))}}

_COSINE = {"plugins": {"distill": {"lr_schedule": "cosine", "lr_min_ratio": 0.05}}}
#: The offline baseline (docs/QUALITY.md, "Offline fits"): collect 32 prompts × 20 steps of attention per layer (no
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


def _joint(joint: dict[str, Any]) -> dict[str, Any]:
    """The product default with the joint layer (settings `joint`) on the double blocks."""
    return merge(PRODUCT_DEFAULT, {"plugins": {"ttr": {"joint_layers": ["double:*"], "joint": joint}}})


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
    # the product default (window r2, α_max 0.5, 2 % landmarks), trained like "default"
    # (the demo's query subsample, its positions handed to the window)
    "product default": Variant(PRODUCT_DEFAULT),
    # every layer distilled and served, with the per-layer effect table: the hybrid layer everywhere (today), or the
    # joint layer on the double blocks (plugins/ttr/joint.py) and the hybrid layer on the single blocks
    "hybrid everywhere": Variant(PRODUCT_DEFAULT, servings=("all ready", "double blocks", "single blocks",
                                                             "layer effects")),
    "joint shared": Variant(_joint({"combine": "shared"}), servings=("all ready", "double blocks", "single blocks",
                                                                      "layer effects")),
    "joint blend": Variant(_joint({"combine": "blend"}), servings=("all ready", "double blocks", "only double:0",
                                                                    "only double:1")),
    "joint shared + mlp log-scale": Variant(_joint({"combine": "shared", "log_scale": "mlp"}),
                                            servings=("all ready", "double blocks", "only double:0", "only double:1")),
}


def _product(ttr: dict[str, Any] | None = None, landmark: dict[str, Any] | None = None) -> Variant:
    """The product default with `ttr` / `landmark` overrides (the large testbeds' front)."""
    return Variant(merge(PRODUCT_DEFAULT, {"plugins": {"ttr": ttr or {}, "landmark": landmark or {}}}))


#: The speed-vs-quality front at 4 096 and 16 384 image tokens: the product default and one change each — the
#: landmark budget (1 %, or a cap of 256 / 128 landmarks: 2 % of 16 384 is 328), the window radius, a lighter φ.
LARGE_VARIANTS: dict[str, Variant] = {
    "product default + landmarks 1 %": _product(landmark={"fraction": 0.01}),
    "product default + landmarks max 256": _product(landmark={"max": 256}),
    "product default + landmarks max 128": _product(landmark={"max": 128}),
    "product default + window r1": _product(landmark={"window": 1}),
    "product default + window r4": _product(landmark={"window": 4}),
    "product default + 1-layer F64": _product(ttr={"depth": 1, "feature_dim": 64}),
    "product default + 1-layer F128": _product(ttr={"depth": 1, "feature_dim": 128}),
}
VARIANTS.update(LARGE_VARIANTS)
#: The `attnplug bench --configs` name that times each variant's layer (bench/variants.py's TTR_CONFIGS).
BENCH_CONFIG: dict[str, str] = {
    "product default": "default",
    "product default + landmarks 1 %": "default-lm1pct",
    "product default + landmarks max 256": "default-max256",
    "product default + landmarks max 128": "default-max128",
    "product default + window r1": "default-window1",
    "product default + window r4": "default-window4",
    "product default + 1-layer F64": "default-1layer-F64",
    "product default + 1-layer F128": "default-1layer-F128",
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
    # … and by the call's own mean (two passes): the other way, for layers whose config serves with the running mean
    "single blocks + call α": {"gates": [_SINGLE], "plugins": {"ttr": {"alpha_reference": "call"}}},
    "double blocks": {"gates": [{"kind": "layers", "include": ["double:*"]}]},
}
#: The servings a variant without its own list evaluates (when `--serving` names none).
DEFAULT_SERVING = ("all ready", "single blocks", "single blocks from step 2", "all but double:0",
                   "single blocks + running α")

#: The testbed's layers in the order of the cumulative rows of the layer-effect table: the double blocks first, so
#: that the second cumulative row is "double blocks" and the last "all ready".
EFFECT_ORDER = ("double:0", "double:1", *(f"single:{i}" for i in range(6)))


def _layer_effect_servings() -> dict[str, dict[str, Any]]:
    """`only <layer>` (that layer alone) and `cumulative to <layer>` (every layer of `EFFECT_ORDER` up to it); the
    cumulative rows that are other servings share their overlay (so they are evaluated once)."""
    out: dict[str, dict[str, Any]] = {}
    for i, key in enumerate(EFFECT_ORDER):
        out[f"only {key}"] = {"gates": [{"kind": "layers", "include": [key]}]}
        if i == 0:
            out[f"cumulative to {key}"] = out[f"only {key}"]
        elif EFFECT_ORDER[:i + 1] == ("double:0", "double:1"):
            out[f"cumulative to {key}"] = SERVING["double blocks"]
        elif i == len(EFFECT_ORDER) - 1:
            out[f"cumulative to {key}"] = SERVING["all ready"]
        else:
            out[f"cumulative to {key}"] = {"gates": [{"kind": "layers", "include": list(EFFECT_ORDER[:i + 1])}]}
    return out


SERVING.update(_layer_effect_servings())
#: Names `--serving` (and a variant's `servings`) may use for several servings at once.
SERVING_GROUPS: dict[str, tuple[str, ...]] = {
    "layer effects": tuple(f"{what} {key}" for what in ("only", "cumulative to") for key in EFFECT_ORDER)}


def expand_servings(names: "list[str] | tuple[str, ...]") -> list[str]:
    """Serving names with groups expanded, in order, each once."""
    out: list[str] = []
    for name in names:
        for serve in SERVING_GROUPS.get(name, (name,)):
            if serve not in out:
                out.append(serve)
    return out


def base_config() -> dict[str, Any]:
    """The demo config, widened to train every layer (double and single blocks), on the `BASELINE` layer."""
    cfg = merge(read_config_file(DEMO_CONFIG), BASELINE)
    cfg["gates"] = []
    cfg["plugins"]["distill"]["layers"] = ["*"]
    cfg["plugins"]["distill"]["min_swap_layers"] = 8
    cfg["loggers"] = [{"kind": "console", "every": 200, "scopes": ["distill"]}]
    return cfg


PHASES = ("both", "distill", "evaluate")


def run(out: Path, device: str, plan: DemoPlan, variants: list[str], budget_s: float,
        layers: list[str] | None = None, serving: list[str] | None = None, seed: int = 0,
        eval_workers: int = 1, phase: str = "both", testbed: str | None = None) -> list[dict[str, Any]]:
    """Distill and evaluate each variant in turn; stops starting new ones when the budget is spent.

    `layers`: train only these layer patterns (default: every layer); `serving`: names of `SERVING`;
    `seed`: training prompts, noise and the held-out evaluation set (another seed = an independent repeat);
    `eval_workers`: processes that evaluate the servings of a checkpoint side by side; `phase`: "distill" only
    writes each variant's checkpoint and distillation metrics, "evaluate" evaluates the checkpoints an earlier
    "distill" left in `out` (so that the two fit separate time-limited GPU calls); `testbed`: the registry's
    testbed to distil on and evaluate (None: the default)."""
    if phase not in PHASES:
        raise ValueError(f"phase: {phase!r}, expected one of {PHASES}")
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
        checkpoint = out / folder_name(name) / "ttr.safetensors"
        if phase == "evaluate":
            if not checkpoint.is_file():
                raise FileNotFoundError(f"{checkpoint}: no checkpoint of variant {name!r} to evaluate; run the "
                                        "distill phase into this folder first")
            metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
        else:
            metrics = run_demo(out / folder_name(name), device=device, config=cfg, plan=vplan, progress=False,
                               seed=seed, evaluate_after=False, testbed=testbed)
        row = {"variant": name, "seed": seed, "testbed": testbed or "default", "plan": vplan.__dict__,
               "distill": metrics["distill"], "serving": {},
               "checkpoint": str(checkpoint.resolve()), "config": cfg}
        rows.append(row)
        if phase == "distill":
            write_tables(out, rows)
            continue
        names = expand_servings(serving or variant.servings or DEFAULT_SERVING)

        def record(results: dict[str, dict[str, Any]]) -> None:
            """Put finished servings into the row, in the order of `names`, and rewrite the tables (a process stopped
            early keeps them)."""
            done = dict(row["serving"])
            row["serving"] = {}
            for serve in names:
                key = json.dumps(SERVING[serve], sort_keys=True)
                if key not in results:
                    continue
                res = row["serving"][serve] = results[key]
                if serve not in done:
                    print(f"[quality] {name} / {serve}: served {len(res['layers_served'])}/{len(res['layers'])} "
                          f"adherence {100 * res['adherence_exact']:.2f} -> {100 * res['adherence_approx']:.2f} "
                          f"vcos {res['velocity_cosine']:.3f} psnr {res['psnr_db']:.1f}", flush=True)
            write_tables(out, rows)

        evaluate_servings(cfg, checkpoint, names, plan, device, seed, eval_workers, record, testbed)
    return rows


def write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    (out / "quality.json").write_text(json.dumps(rows, indent=2))
    (out / "quality.md").write_text(table(rows))
    (out / "effects.md").write_text(effects_table(rows))


def _evaluate_group(overlays: list[str], cfg: dict[str, Any], checkpoint: str, n_prompts: int, steps: int,
                    device: str, seed: int, testbed: str | None = None,
                    reference: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate one checkpoint under several serving overlays (JSON) with one shared exact pass (`reference`: the
    exact pass of an earlier group of this process, filled by the first)."""
    reference = {} if reference is None else reference
    return {key: strip_images(evaluate(merge(cfg, json.loads(key)), checkpoint, n_prompts=n_prompts, steps=steps,
                                       device=device, seed=seed, reference=reference, testbed=testbed))
            for key in overlays}


def evaluate_servings(cfg: dict[str, Any], checkpoint: Path, names: list[str], plan: DemoPlan, device: str,
                      seed: int, workers: int, record: Any, testbed: str | None = None) -> None:
    """Evaluate `names` (servings with the same overlay once), in `workers` spawned processes when > 1 (each with its
    own exact pass); `record(results)` is called with the results so far after each group."""
    keys = list(dict.fromkeys(json.dumps(SERVING[n], sort_keys=True) for n in names))
    args = (cfg, str(checkpoint), plan.eval_prompts, plan.eval_steps, device, seed, testbed)
    if workers > 1 and len(keys) > 1:
        done = run_side_by_side(_evaluate_group, [keys[i::workers] for i in range(min(workers, len(keys)))], *args)
    else:  # one serving at a time, each recorded as soon as it exists, all sharing one exact pass
        shared: dict[str, Any] = {}
        done = (_evaluate_group([key], *args, reference=shared) for key in keys)
    results: dict[str, dict[str, Any]] = {}
    for group in done:
        results.update(group)
        record(results)


def folder_name(variant: str) -> str:
    """A file-system name of a variant: letters, digits, '.', '_' and '-' only."""
    text = variant.replace("%", "pct").replace("φ", "phi").replace("×", "x").replace("α", "alpha").replace("+", "and")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | seed | serving | ready | served | adherence exact → approx | drop, points | velocity cos | PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        testbed = "" if row.get("testbed", "default") == "default" else f" ({row['testbed']})"
        for serve, r in row["serving"].items():
            lines.append(f"| {row['variant']}{testbed} | {row.get('seed', 0)} | {serve} | {len(r['layers_ready'])}/{len(r['layers'])} | "
                         f"{len(r['layers_served'])}/{len(r['layers'])} ({', '.join(r['layers_served'])}) | "
                         f"{100 * r['adherence_exact']:.2f} → {100 * r['adherence_approx']:.2f} | "
                         f"{r['adherence_drop_points']:+.2f} | {r['velocity_cosine']:.3f} | {r['psnr_db']:.1f} |")
    return "\n".join(lines) + "\n"


def effects_table(rows: list[dict[str, Any]]) -> str:
    """The per-layer effect table: per variant, the drop (points) with each layer served alone and with every layer
    of `EFFECT_ORDER` up to it served, one column pair per seed; empty when no row has the layer-effect servings."""
    names = [n for n in dict.fromkeys(r["variant"] for r in rows)
             if any(f"only {EFFECT_ORDER[0]}" in r["serving"] for r in rows if r["variant"] == n)]
    parts = []
    for name in names:
        seeds = [r for r in rows if r["variant"] == name]
        head = " | ".join(f"alone, seed {r.get('seed', 0)} | cumulative, seed {r.get('seed', 0)}" for r in seeds)
        lines = [f"#### {name}", "", f"| layer | {head} |", "|---" * (1 + 2 * len(seeds)) + "|"]
        for key in EFFECT_ORDER:
            cells = []
            for r in seeds:
                for what in ("only", "cumulative to"):
                    res = r["serving"].get(f"{what} {key}")
                    cells.append("" if res is None else f"{res['adherence_drop_points']:+.2f}")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def collect(out: Path) -> list[dict[str, Any]]:
    """Merge the `quality.json` of every sub-folder of `out` (variants run in parallel processes) into
    `out/quality.json`, `out/quality.md` and `out/effects.md`, in the order of `VARIANTS`."""
    rows = [row for path in sorted(out.glob("*/quality.json")) for row in json.loads(path.read_text())]
    order = {name: i for i, name in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (order.get(r["variant"], len(order)), r.get("seed", 0)))
    (out / "quality.json").write_text(json.dumps(rows, indent=2))
    (out / "quality.md").write_text(table(rows))
    (out / "effects.md").write_text(effects_table(rows))
    return rows


def keep_best(rows: list[dict[str, Any]], dest: Path, serving: str = "all ready") -> dict[str, Any] | None:
    """Copy the checkpoint of the best joint variant (smallest mean drop over its seeds with `serving`; its lowest
    seed's file) to `dest/ttr_all_layers.safetensors` with its serving config `dest/serve_all_layers.toml`.
    Returns that row, or None when no joint variant has a result for `serving`."""
    joint = [r for r in rows if r.get("config", {}).get("plugins", {}).get("ttr", {}).get("joint_layers")
             and serving in r["serving"] and r.get("checkpoint") and Path(r["checkpoint"]).is_file()]
    if not joint:
        return None
    drops: dict[str, list[float]] = {}
    for r in joint:
        drops.setdefault(r["variant"], []).append(r["serving"][serving]["adherence_drop_points"])
    best = min(drops, key=lambda n: sum(drops[n]) / len(drops[n]))
    row = min((r for r in joint if r["variant"] == best), key=lambda r: r.get("seed", 0))
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(row["checkpoint"], dest / "ttr_all_layers.safetensors")
    (dest / "serve_all_layers.toml").write_text(serving_config(row["config"], best, row))
    return row


def serving_config(cfg: dict[str, Any], variant: str, row: dict[str, Any]) -> str:
    """The TOML that serves a distilled checkpoint of `cfg` on every ready layer, no gates, no training: the ttr and
    landmark settings that differ from the defaults (a checkpoint's architecture must match), and the layer fields
    a product default has changed before (`PREVIOUS_DEFAULTS`) pinned in the file, so that it keeps meaning this
    layer when the defaults move."""
    pinned_ttr = TtrSettings(**{k: v for k, v in cfg["plugins"].get("ttr", {}).items() if k != "joint"}).model_dump(
        include=set(TTR_PREVIOUS))
    pinned_lm = LandmarkSettings(**cfg["plugins"].get("landmark", {})).model_dump(include=set(LANDMARK_PREVIOUS))
    ttr = {**pinned_ttr, **{k: v for k, v in cfg["plugins"].get("ttr", {}).items()
                            if TtrSettings.model_fields[k].get_default(call_default_factory=True) != v}}
    lm = {**pinned_lm, **{k: v for k, v in cfg["plugins"].get("landmark", {}).items()
                          if LandmarkSettings.model_fields[k].get_default(call_default_factory=True) != v}}
    res = row["serving"].get("all ready", {})
    lines = [f"# Serve testbed/weights/ttr_all_layers.safetensors on every layer of the testbed: variant {variant!r} of",
             "# testbed/quality.py (the joint layer on the double blocks, the hybrid layer on the single blocks), distilled",
             f"# online (seed {row.get('seed', 0)}); {res.get('n_prompts', '?')} held-out prompts: adherence "
             f"{100 * res.get('adherence_exact', float('nan')):.2f} -> {100 * res.get('adherence_approx', float('nan')):.2f} %.",
             "# docs/QUALITY.md, \"The joint layer\".", 'backend = "ttr"', 'exact = "host"', ""]
    joint = ttr.pop("joint", None)
    joint = None if joint is None else JointSettings(**joint).model_dump()  # every field pinned
    for section, values in (("plugins.landmark", lm), ("plugins.ttr", ttr)):
        if values:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
    if joint:
        lines.append("[plugins.ttr.joint]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in joint.items()]
        lines.append("")
    lines += ["[[loggers]]", 'kind = "console"', "scopes = []", ""]
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # strings, numbers, booleans and lists of them are valid TOML


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
    ap.add_argument("--distill-budget-s", type=float, default=0.0,
                    help="Stop each distillation after this many seconds and save it (0: the plan's runs); the "
                         "rows record the runs done.")
    ap.add_argument("--layers", default="", help="Comma list of layer patterns to train (default: all).")
    ap.add_argument("--serving", default="", help="Comma list of servings to evaluate (default: the variant's own, "
                                                  f"else {list(DEFAULT_SERVING)}); groups: {list(SERVING_GROUPS)}; "
                                                  f"all: {list(SERVING)}.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of training prompts, noise and held-out set.")
    ap.add_argument("--eval-workers", type=int, default=1,
                    help="Processes that evaluate one checkpoint's servings side by side (each with its own exact pass).")
    ap.add_argument("--phase", choices=PHASES, default="both",
                    help="distill: only distill (checkpoints and metrics in OUT); evaluate: evaluate the checkpoints "
                         "a distill phase left in OUT; both (the default): one after the other.")
    ap.add_argument("--testbed", default=None, help="The registry's testbed to distil on and evaluate (default: "
                                                    "the default testbed; grid64, grid128: testbed/registry.py).")
    ap.add_argument("--collect", action="store_true",
                    help="Only merge OUT/*/quality.json (variants run as separate processes) into OUT.")
    ap.add_argument("--keep-best", type=Path, default=None,
                    help="With --collect: copy the best joint variant's all-layer checkpoint and its serving config "
                         "into this folder (ttr_all_layers.safetensors, serve_all_layers.toml).")
    a = ap.parse_args(argv)
    if a.collect:
        rows = collect(a.out)
        print(table(rows))
        print(effects_table(rows))
        if a.keep_best is not None:
            best = keep_best(rows, a.keep_best)
            print("no joint variant with an 'all ready' row: nothing kept" if best is None else
                  f"kept {best['variant']} (seed {best.get('seed', 0)}): {a.keep_best / 'ttr_all_layers.safetensors'}")
        return 0
    unknown = [v for v in a.variants.split(",") if v.strip() and v.strip() not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    if a.testbed is not None:
        from .registry import get_testbed

        try:
            get_testbed(a.testbed).require_weights()
        except (ValueError, OSError) as exc:
            print(f"testbed.quality: {exc}", file=sys.stderr)
            return 2
    plan = DemoPlan(runs=a.runs, prompts_per_run=a.prompts_per_run, steps=a.steps, eval_prompts=a.eval_prompts,
                    eval_steps=a.eval_steps, max_seconds=a.distill_budget_s)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    bad = [x for x in split(a.serving) if x not in SERVING and x not in SERVING_GROUPS]
    if bad:
        ap.error(f"--serving: unknown {bad}; known: {list(SERVING)}")
    run(a.out, a.device, plan, split(a.variants), a.budget_s, split(a.layers), split(a.serving), a.seed,
        max(1, a.eval_workers), a.phase, a.testbed)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
