"""The paired testbed measurement behind `[plugins.ttr] feature_precision`'s default (GPU).

`python -m attnplug.bench.precision --out DIR --device cuda --seeds 0,1` evaluates ttr checkpoints on the testbed
(testbed/: a small Flux transformer trained on digit mosaics, its adherence read by a classifier) with the model in
bf16 — so the served layers see bf16 q, k, v, as in a real model — on the same held-out prompts and noise, these
ways per seed:

- `float32`: the PyTorch path (`kernel = "torch"`), φ's MLP in fp32;
- `input`:   the PyTorch path, φ's MLP in the input dtype (bf16 matmuls; S, z and the division stay fp32);
- `fused`:   the product path on a GPU (`kernel = "auto"`: the fused kernels, whose φ is the `input` one — bf16
  matmuls, fp32 accumulation);
- `fp32 model`: the same checkpoint with the model in fp32 (where both precisions are fp32): the ceiling.

If `input`'s quality holds against `float32` on both seeds, the faster one can be the default. Which checkpoint:
with `--distill`, each seed first distils the product default online on the testbed's single blocks
(`testbed.quality`'s "product default" variant, its plan, `--runs` runs) and evaluates that; without, the committed
`testbed/weights/ttr_window.safetensors` with `testbed/configs/serve_single_window.toml` (the default layer with the
checkpoint's landmark budget). Prints a table (adherence drop, velocity cosine, PSNR, seconds per step) and writes
`DIR/precision.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

WAYS: dict[str, dict[str, Any]] = {
    "float32": {"plugins": {"ttr": {"kernel": "torch", "feature_precision": "float32"}}},
    "input": {"plugins": {"ttr": {"kernel": "torch", "feature_precision": "input"}}},
    "fused": {"plugins": {"ttr": {"kernel": "auto"}}},
}
COMMITTED = ("testbed/configs/serve_single_window.toml", "testbed/weights/ttr_window.safetensors")


def distilled(out: Path, device: str, seed: int, runs: int) -> tuple[dict[str, Any], Path]:
    """(serving config, checkpoint) of the product default distilled online on the single blocks with `seed`."""
    from ..testbed.demo import DemoPlan, run_demo
    from ..testbed.quality import SERVING, VARIANTS, base_config, merge

    variant = VARIANTS["product default"]
    plan = variant.plan(DemoPlan(runs=runs, prompts_per_run=8, steps=20, eval_prompts=1, eval_steps=4))
    base = base_config()
    base["plugins"]["distill"].update(layers=["single:*"], min_swap_layers=10_000, max_swap_layers=-1)
    cfg = variant.config(base, plan)
    folder = out / f"distill_seed{seed}"
    run_demo(folder, device=device, config=cfg, plan=plan, progress=False, seed=seed)
    return merge(cfg, SERVING["single blocks"]), folder / "ttr.safetensors"


def run(out: Path, device: str, seeds: list[int], prompts: int, steps: int, distill: bool, runs: int,
        root: Path) -> list[dict[str, Any]]:
    from ..core.config import read_config_file
    from ..testbed.evaluate import evaluate, strip_images
    from ..testbed.quality import merge

    rows: list[dict[str, Any]] = []
    for seed in seeds:
        if distill:
            config, checkpoint = distilled(out, device, seed, runs)
        else:
            config, checkpoint = read_config_file(root / COMMITTED[0]), root / COMMITTED[1]
        ways = [(name, over, torch.bfloat16) for name, over in WAYS.items()] + [("fp32 model", {}, torch.float32)]
        for name, over, dtype in ways:
            res = strip_images(evaluate(merge(config, over), checkpoint, n_prompts=prompts, steps=steps, seed=seed,
                                        device=device, dtype=dtype))
            row = {"seed": seed, "way": name, "checkpoint": str(checkpoint), **res}
            rows.append(row)
            print(f"[precision] seed {seed} {name:<10} served {len(res['layers_served'])}/{len(res['layers'])} "
                  f"drop {res['adherence_drop_points']:+.2f} points, vcos {res['velocity_cosine']:.4f}, "
                  f"PSNR {res['psnr_db']:.1f} dB, {1e3 * res['seconds_per_step_approx']:.1f} ms/step", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "precision.json").write_text(json.dumps(rows, indent=1))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seed | φ precision | model | served | adherence exact → ttr | drop, points | velocity cos | PSNR dB | "
             "ms/step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['way']} | {r['dtype']} | {len(r['layers_served'])}/{len(r['layers'])} | "
                     f"{100 * r['adherence_exact']:.2f} → {100 * r['adherence_approx']:.2f} | "
                     f"{r['adherence_drop_points']:+.2f} | {r['velocity_cosine']:.4f} | {r['psnr_db']:.1f} | "
                     f"{1e3 * r['seconds_per_step_approx']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnplug-bench-precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seeds", default="0,1", help="held-out prompts and noise (and, with --distill, training)")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts per evaluation")
    p.add_argument("--steps", type=int, default=20, help="sampling steps per evaluation")
    p.add_argument("--distill", action="store_true", help="distil the product default per seed first")
    p.add_argument("--runs", type=int, default=60, help="with --distill: sampling runs of the distillation")
    a = p.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        print(f"attnplug bench precision: --seeds: expected a comma list of ints, got {a.seeds!r}", file=sys.stderr)
        return 2
    rows = run(a.out, a.device, seeds, a.prompts, a.steps, a.distill, a.runs, root)
    text = table(rows)
    (a.out / "precision.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":  # python -m attnplug.bench.precision
    raise SystemExit(main())
