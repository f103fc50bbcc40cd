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
import sys
import time
from pathlib import Path
from typing import Any

from ..core.config import read_config_file
from .demo import DEMO_CONFIG, DemoPlan, run_demo
from .evaluate import evaluate, strip_images

#: name → overrides of the base config (deep-merged). The base trains every layer; readiness decides.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "kernel-only": {"plugins": {"ttr": {"landmark": False}}},
    "1-layer F64 hedgehog": {"plugins": {"ttr": {"depth": 1, "feature_dim": 64, "activation": "hedgehog"}}},
    "1-layer F128 elu+1": {"plugins": {"ttr": {"depth": 1, "feature_dim": 128}}},
    "landmarks 2 %": {"plugins": {"landmark": {"fraction": 0.02, "min": 16}}},
    "per-head φ": {"plugins": {"ttr": {"per_head": True}}},
}

#: Ways to serve a distilled checkpoint: name → gates (readiness always applies on top).
SERVING: dict[str, list[dict[str, Any]]] = {
    "all ready": [],
    "single blocks": [{"kind": "layers", "include": ["single:*"]}],
    "all but double:0": [{"kind": "layers", "exclude": ["double:0"]}],
}


def base_config() -> dict[str, Any]:
    """The demo config, widened to train every layer (double and single blocks)."""
    cfg = read_config_file(DEMO_CONFIG)
    cfg["gates"] = []
    cfg["plugins"]["distill"]["layers"] = ["*"]
    cfg["plugins"]["distill"]["min_swap_layers"] = 8
    cfg["loggers"] = [{"kind": "console", "every": 200, "scopes": ["distill"]}]
    return cfg


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(out: Path, device: str, plan: DemoPlan, variants: list[str], budget_s: float) -> list[dict[str, Any]]:
    """Distill and evaluate each variant in turn; stops starting new ones when the budget is spent."""
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in variants:
        if time.perf_counter() - t0 > budget_s:
            print(f"[quality] budget spent; skipping {name}", flush=True)
            continue
        cfg = merge(base_config(), VARIANTS[name])
        folder = out / name.replace(" ", "_").replace("%", "pct").replace("φ", "phi")
        metrics = run_demo(folder, device=device, config=cfg, plan=plan, progress=False)
        row = {"variant": name, "distill": metrics["distill"], "serving": {}}
        for serve, gates in SERVING.items():
            res = strip_images(evaluate(merge(cfg, {"gates": gates}), folder / "ttr.safetensors",
                                        n_prompts=plan.eval_prompts, steps=plan.eval_steps, device=device))
            row["serving"][serve] = res
            print(f"[quality] {name} / {serve}: served {len(res['layers_served'])}/{len(res['layers'])} "
                  f"adherence {100 * res['adherence_exact']:.2f} -> {100 * res['adherence_approx']:.2f} "
                  f"vcos {res['velocity_cosine']:.3f} psnr {res['psnr_db']:.1f}", flush=True)
        rows.append(row)
        (out / "quality.json").write_text(json.dumps(rows, indent=2))
        (out / "quality.md").write_text(table(rows))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | serving | ready | served | adherence exact → approx | Δ points | velocity cos | PSNR dB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for serve, r in row["serving"].items():
            lines.append(f"| {row['variant']} | {serve} | {len(r['layers_ready'])}/{len(r['layers'])} | "
                         f"{len(r['layers_served'])}/{len(r['layers'])} ({', '.join(r['layers_served'])}) | "
                         f"{100 * r['adherence_exact']:.2f} → {100 * r['adherence_approx']:.2f} | "
                         f"{r['adherence_drop_points']:+.2f} | {r['velocity_cosine']:.3f} | {r['psnr_db']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--prompts-per-run", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budget-s", type=float, default=420.0, help="Start no new variant after this many seconds.")
    a = ap.parse_args(argv)
    plan = DemoPlan(runs=a.runs, prompts_per_run=a.prompts_per_run, steps=a.steps, eval_prompts=a.eval_prompts,
                    eval_steps=a.eval_steps)
    run(a.out, a.device, plan, [v.strip() for v in a.variants.split(",") if v.strip()], a.budget_s)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
