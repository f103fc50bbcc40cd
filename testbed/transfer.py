"""Resolution transfer: distil ttr on one testbed, serve it on another (and on its own), both α references.

`python -m attnplug.testbed.transfer --out DIR --testbeds default,grid64 --device cuda` distils the product
default online on each named testbed (the six single blocks, as docs/QUALITY.md's "Trained as a user trains
it"), then evaluates every checkpoint on every testbed, serving the single blocks with adaptive α's d
normalised by the call's own mean (`alpha_reference = "call"`) and by the running mean kept while distilling
(`"running"`: the mean of the size it was distilled at). Writes `DIR/transfer.json` and `DIR/transfer.md`;
`--distil-on NAME` distils on that testbed only (one process per source side by side on one GPU);
`--checkpoints NAME=PATH,...` evaluates existing checkpoints instead of distilling (NAME: the testbed each
was distilled on), with `--config` serving the layers that config serves (e.g. every layer of
`ttr_all_layers.safetensors` with `serve_all_layers.toml`); `--collect` merges the `transfer.json` of DIR's sub-folders into DIR.

The testbeds share one layer family (heads and head size), so a checkpoint of one loads on another;
`check_fits` refuses, in one line, a checkpoint whose layers another architecture built. The testbeds are not one
model at two sizes: each larger one is a fine-tune of the smaller, so a row here measures a change of model as
well as of size, and its servings set `other_model = "serve"` (a session would otherwise withhold the layers:
core/model_identity.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..core.checkpoint import CheckpointError, load_checkpoint
from .model import TestbedConfig

ALPHA_REFERENCES = ("call", "running")
SERVE_SINGLE = {"gates": [{"kind": "layers", "include": ["single:*"]}]}


def checkpoint_layers(checkpoint: str | Path) -> dict[str, dict[str, Any]]:
    """The learned layers a checkpoint holds: key → its meta (heads, head_dim, ready, ...), every backend merged."""
    layers: dict[str, dict[str, Any]] = {}
    for name, (_, meta) in load_checkpoint(checkpoint).items():
        if name.startswith("backend.") and isinstance(meta.get("layers"), dict):
            layers.update({k: v for k, v in meta["layers"].items() if isinstance(v, dict)})
    return layers


def check_fits(checkpoint: str | Path, cfg: TestbedConfig, testbed: str = "the testbed") -> None:
    """Refuse (`CheckpointError`, one line) a checkpoint whose layers do not fit `cfg`: another head count or head
    size, or layer keys the architecture does not have."""
    layers = checkpoint_layers(checkpoint)
    keys = set(cfg.layer_keys())
    want = (cfg.num_attention_heads, cfg.attention_head_dim)
    bad = sorted(k for k, m in layers.items() if (m.get("heads"), m.get("head_dim")) != want)
    if bad:
        got = layers[bad[0]]
        raise CheckpointError(f"checkpoint {checkpoint}: layer {bad[0]} was distilled for {got.get('heads')} heads x "
                              f"{got.get('head_dim')}, {testbed} has {want[0]} x {want[1]} ({len(bad)} layer(s) "
                              "differ): it comes from another model family")
    unknown = sorted(set(layers) - keys)
    if unknown:
        raise CheckpointError(f"checkpoint {checkpoint}: layers {unknown[:4]} do not exist in {testbed} "
                              f"({cfg.num_layers} double + {cfg.num_single_layers} single blocks)")


def serving(alpha_reference: str) -> dict[str, Any]:
    """The config overlay of one transfer serving: α's d normalised by `alpha_reference`."""
    if alpha_reference not in ALPHA_REFERENCES:
        raise ValueError(f"alpha_reference must be one of {ALPHA_REFERENCES}, got {alpha_reference!r}")
    return {"plugins": {"ttr": {"alpha_reference": alpha_reference}}}


def distill(out: Path, testbed: str, device: str, plan: Any, seed: int) -> Path:
    """Distil the product default online on `testbed`'s single blocks; returns the checkpoint."""
    from .demo import run_demo
    from .quality import PRODUCT_DEFAULT, base_config, merge

    cfg = merge(base_config(), PRODUCT_DEFAULT)
    cfg["plugins"]["distill"].update(layers=["single:*"], min_swap_layers=10_000, max_swap_layers=-1)
    folder = out / f"distilled_on_{testbed}"
    run_demo(folder, device=device, config=cfg, plan=plan, progress=False, seed=seed, evaluate_after=False,
             testbed=testbed)
    return folder / "ttr.safetensors"


def cross_evaluate(checkpoints: dict[str, Path], testbeds: list[str], *, n_prompts: int, steps: int, device: str,
                   seed: int, out: Path | None = None, config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every checkpoint (distilled on key) on every testbed, both α references; one exact pass per
    (checkpoint, testbed). `config`: the serving config the overlays go on, serving the layers its gates allow
    (default: the product default's on the single blocks, as `distill` trained it). Rows are written to `out` as
    they finish when given."""
    from .evaluate import evaluate, strip_images
    from .quality import PRODUCT_DEFAULT, base_config, merge

    cfg = config if config is not None else merge(merge(base_config(), PRODUCT_DEFAULT), SERVE_SINGLE)
    cfg = merge(cfg, {"other_model": "serve"})  # a checkpoint of one testbed on another's transformer: measured
    rows: list[dict[str, Any]] = []
    for source, ckpt in checkpoints.items():
        for target in testbeds:
            reference: dict[str, Any] = {}
            for alpha in ALPHA_REFERENCES:
                t0 = time.perf_counter()
                res = strip_images(evaluate(merge(cfg, serving(alpha)), ckpt, n_prompts=n_prompts, steps=steps,
                                            device=device, seed=seed, reference=reference, testbed=target))
                rows.append({"distilled_on": source, "served_on": target, "alpha_reference": alpha,
                             "checkpoint": str(ckpt), "seconds": time.perf_counter() - t0, **res})
                print(f"[transfer] {source} -> {target} ({alpha}): adherence {100 * res['adherence_exact']:.2f} -> "
                      f"{100 * res['adherence_approx']:.2f} vcos {res['velocity_cosine']:.4f}", flush=True)
                if out is not None:
                    write(out, rows)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [("| distilled on | served on | α reference | served | adherence exact → ttr | drop, points | velocity cos | "
              "PSNR dB |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['distilled_on']} | {r['served_on']} | {r['alpha_reference']} | "
                     f"{len(r['layers_served'])}/{len(r['layers'])} | {100 * r['adherence_exact']:.2f} → "
                     f"{100 * r['adherence_approx']:.2f} | {r['adherence_drop_points']:+.2f} | "
                     f"{r['velocity_cosine']:.4f} | {r['psnr_db']:.1f} |")
    return "\n".join(lines) + "\n"


def write(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps(rows, indent=1))
    (out / "transfer.md").write_text(table(rows))


def main(argv: list[str] | None = None) -> int:
    from .demo import DemoPlan

    ap = argparse.ArgumentParser(prog="python -m attnplug.testbed.transfer", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--testbeds", default="default,grid64", help="comma list: distil on each, serve on each")
    ap.add_argument("--distil-on", default="", help="comma list: distil on these only (default: every --testbeds)")
    ap.add_argument("--collect", action="store_true", help="only merge OUT/*/transfer.json into OUT")
    ap.add_argument("--checkpoints", default="", help="NAME=PATH,...: evaluate these instead of distilling "
                                                      "(NAME: the testbed each was distilled on)")
    ap.add_argument("--config", type=Path, default=None, help="serving config of --checkpoints (default: the "
                                                              "product default's, as this module distils it)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--prompts-per-run", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from .registry import get_testbed

    if a.collect:
        rows = [r for p in sorted(a.out.glob("*/transfer.json")) for r in json.loads(p.read_text())]
        write(a.out, rows)
        print(table(rows))
        return 0
    testbeds = [t.strip() for t in a.testbeds.split(",") if t.strip()]
    try:
        beds = [get_testbed(t) for t in testbeds]
        for bed in beds:
            bed.require_weights()
    except (ValueError, OSError) as exc:
        print(f"transfer: {exc}", file=sys.stderr)
        return 2
    plan = DemoPlan(runs=a.runs, prompts_per_run=a.prompts_per_run, steps=a.steps)
    if a.checkpoints:
        checkpoints = {k.strip(): Path(v.strip()) for k, _, v in (x.partition("=") for x in a.checkpoints.split(","))}
    else:
        sources = [t.strip() for t in a.distil_on.split(",") if t.strip()] or testbeds
        checkpoints = {t: distill(a.out, t, a.device, plan, a.seed) for t in sources}
    try:
        for ckpt in checkpoints.values():
            for bed in beds:
                check_fits(ckpt, bed.config, f"testbed {bed.name!r}")
    except CheckpointError as exc:
        print(f"transfer: {exc}", file=sys.stderr)
        return 2
    from ..core.config import read_config_file

    rows = cross_evaluate(checkpoints, testbeds, n_prompts=a.eval_prompts, steps=a.steps, device=a.device,
                          seed=a.seed, out=a.out, config=read_config_file(a.config) if a.config else None)
    print(table(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
