"""`attnplug demo`: distill ttr online on the testbed while it samples, then compare exact vs hybrid.

The main job of the README. On the CPU by default and within about 5 minutes on 2 cores:

1. load the trained testbed model and patch its transformer with attnplug's diffusers host, using
   the bundled distillation config (`testbed/configs/demo.toml`);
2. sample training prompts run after run while the online distiller learns every trainable layer
   from the model's own attention (progress bar), then save the checkpoint;
3. evaluate exact against hybrid attention on held-out prompts (`testbed.evaluate`);
4. write a report folder: metrics.json, the checkpoint, distill.jsonl, a PNG grid of exact vs
   hybrid samples, and a plot of loss and readiness per layer over updates.

It says plainly what it ran: how many updates, which layers became ready, which layers served.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from . import data, sampling
from .model import load_testbed

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.toml"


@dataclass
class DemoPlan:
    """How much the demo does. `quick()` is the reduced mode CI runs."""

    runs: int = 36
    prompts_per_run: int = 1
    steps: int = 12
    eval_prompts: int = 6
    eval_steps: int = 12
    fit_updates: int = 0  # after sampling, this many more updates per layer on its replay (offline fit)
    # stop starting sampling runs after this many seconds of distillation and save what was learned (0: no limit),
    # so that a time-limited GPU call always leaves a checkpoint; the metrics record the runs done
    max_seconds: float = 0.0

    @classmethod
    def quick(cls) -> "DemoPlan":
        return cls(runs=2, prompts_per_run=1, steps=4, eval_prompts=1, eval_steps=4)


class _History:
    """An in-process logger that keeps the distiller's per-layer metrics for the plot."""

    name = "demo-history"

    def __init__(self) -> None:
        self.layer: list[tuple[int, dict[str, Any]]] = []
        self.snapshots: list[tuple[int, dict[str, Any]]] = []

    def log_metrics(self, metrics: Mapping[str, Any], step: int, scope: str) -> None:
        if scope == "distill/layer":
            self.layer.append((step, dict(metrics)))
        elif scope == "distill":
            self.snapshots.append((step, dict(metrics)))

    def run_event(self, event: str, info: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


def run_demo(out: str | Path = "attnplug-demo", *, device: str = "cpu",
             config: "str | Path | Mapping[str, Any] | None" = None,
             plan: DemoPlan | None = None, seed: int = 0, progress: bool = True,
             resume: str | Path | None = None, evaluate_after: bool = True,
             testbed: str | None = None) -> dict[str, Any]:
    """Run the demo and write its report folder; returns the metrics dict (also in metrics.json).

    `resume`: a checkpoint to continue distilling from (layers, readiness and optimizer states).
    `evaluate_after`: step 3 (exact vs hybrid on held-out prompts) and the PNGs; off for callers that evaluate
    the checkpoint their own way (the quality sweep): the metrics then have no "eval".
    `testbed`: the registry's testbed to distil on and evaluate (None: the default; `testbed/registry.py`).
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..core import Session
    from ..core.config import load_config
    from ..hosts.diffusers import apply
    from .evaluate import evaluate, strip_images

    plan = plan or DemoPlan()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "ttr.safetensors"
    config_path = config if isinstance(config, Mapping) else Path(config) if config else DEMO_CONFIG
    cfg = load_config(config_path)
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"attnplug demo --resume: no checkpoint at {resume}")
    cfg.root = cfg.root.model_copy(update={"checkpoint": str(resume) if resume else None, "seed": seed})
    torch.manual_seed(seed)

    # ---- 1-2: distill while sampling --------------------------------------------------------------
    t0 = time.perf_counter()
    session = Session(cfg)
    history = _History()
    jsonl_path = out / "distill.jsonl"
    from ..core.loggers import JsonlLogger, JsonlSettings

    jsonl_path.unlink(missing_ok=True)
    session.loggers.loggers += [history, JsonlLogger(JsonlSettings(path=str(jsonl_path)))]
    model = load_testbed(device, testbed=testbed)
    grid = model.cfg.grid
    handle = apply(model.transformer, session)
    generator = torch.Generator().manual_seed(seed)
    try:
        bar = tqdm(range(plan.runs), desc="distilling", unit="run", disable=not progress)
        with logging_redirect_tqdm():  # warnings are written above the bar, not into it
            runs_done = 0
            for run in bar:
                if plan.max_seconds and time.perf_counter() - t0 > plan.max_seconds:
                    print(f"[demo] distillation budget of {plan.max_seconds:.0f} s spent after {runs_done} of "
                          f"{plan.runs} runs: saving", flush=True)
                    break
                prompts = data.train_prompts(plan.prompts_per_run, grid, generator=generator)
                noise = sampling.initial_noise(plan.prompts_per_run, grid, seed=seed * 1000 + run)
                session.run_start(num_steps=plan.steps)
                images = sampling.sample(model, prompts, noise, steps=plan.steps)
                # [B, 1, H, W] in about [-1, 1] → the loggers' [B, H, W, C] in [0, 1] (e.g. Comet's image panel)
                session.loggers.log_image("distill", ((images + 1) / 2).permute(0, 2, 3, 1), run, "samples")
                session.run_end()
                distiller = session.distiller
                ready = sum(1 for r in getattr(distiller, "readiness", {}).values() if r.ready)
                bar.set_postfix(updates=getattr(distiller, "total_updates", 0), ready=ready)
                runs_done += 1
        if plan.fit_updates:
            fit = getattr(session.distiller, "fit_replay", None)
            if not callable(fit):
                raise ValueError(f"attnplug demo: distiller {cfg.root.distiller!r} cannot fit on its replay "
                                 "(fit_updates needs the ttr distiller)")
            fit(plan.fit_updates)
        session.save(checkpoint)
        distiller = session.distiller
        updates = int(getattr(distiller, "total_updates", 0))
        per_layer_updates = {k: int(r.updates) for k, r in getattr(distiller, "readiness", {}).items()}
        ready_after = sorted(k for k, r in getattr(distiller, "readiness", {}).items() if r.ready)
        trained_layers = sorted(k for k, s in session.stats.items() if s.trained)
    finally:
        handle.remove()
        session.close()
    distill_seconds = time.perf_counter() - t0

    metrics: dict[str, Any] = {
        "plan": plan.__dict__, "device": device, "testbed": testbed or "default", "resumed_from": str(resume) if resume else None,
        "config": dict(config_path) if isinstance(config_path, Mapping) else str(config_path), "checkpoint": str(checkpoint),
        "distill": {"runs": runs_done, "runs_planned": plan.runs, "updates": updates, "updates_per_layer": per_layer_updates,
                    "trained_layers": trained_layers, "ready_layers": ready_after, "seconds": distill_seconds},
    }
    if not evaluate_after:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
    # ---- 3: exact vs hybrid on held-out prompts ---------------------------------------------------
    result = evaluate(cfg, checkpoint, n_prompts=plan.eval_prompts, steps=plan.eval_steps, seed=seed,
                      device=device, testbed=testbed)
    images = result.pop("images")
    metrics["eval"] = strip_images(result)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    try:
        _save_grid(images["exact"], images["approx"], out / "samples.png")
        _plot_history(history, out / "distill.png")
    except ImportError as exc:  # matplotlib is in the `testbed` extra; the metrics are written regardless
        print(f"attnplug demo: no PNGs ({exc}); pip install 'attnplug[testbed]'", file=sys.stderr)
    return metrics


def _save_grid(exact: torch.Tensor, approx: torch.Tensor, path: Path, columns: int = 8) -> None:
    """Top row: exact attention; bottom row: hybrid — same prompts, same noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(columns, exact.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for row, (name, imgs) in enumerate((("exact", exact), ("hybrid", approx))):
        for i in range(n):
            ax = axes[row][i]
            ax.imshow(imgs[i, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_history(history: _History, path: Path) -> None:
    """Loss and EMA cosine distance per layer over updates, readiness as filled markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_cos) = plt.subplots(1, 2, figsize=(11, 4))
    layers = sorted({m["layer"] for _, m in history.layer})
    for key in layers:
        points = [(step, m) for step, m in history.layer if m["layer"] == key]
        steps = [s for s, _ in points]
        ax_loss.plot(steps, [m.get("loss", float("nan")) for _, m in points], label=key)
        cos = [m.get("ema_cos", float("nan")) for _, m in points]
        line, = ax_cos.plot(steps, cos, label=key)
        ready = [(s, c) for (s, m), c in zip(points, cos) if m.get("ready")]
        if ready:
            ax_cos.scatter(*zip(*ready), color=line.get_color(), s=12)
    ax_loss.set(title="distillation loss per layer", xlabel="updates", ylabel="loss")
    ax_cos.set(title="EMA cosine distance (dots: ready)", xlabel="updates", ylabel="1 - cos", yscale="log")
    if layers:
        ax_cos.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(metrics: Mapping[str, Any]) -> str:
    """Plain-language summary of what the demo ran and measured."""
    d, e = metrics["distill"], metrics["eval"]
    lines = [
        f"Distilled online for {d['runs']} sampling runs ({d['updates']} updates, {d['seconds']:.0f} s) on "
        f"{len(d['trained_layers'])} layers: {', '.join(d['trained_layers']) or 'none'}.",
        f"Ready after distillation: {len(d['ready_layers'])} — {', '.join(d['ready_layers']) or 'none'}.",
        f"Held-out evaluation ({e['n_prompts']} prompts × {e['steps']} steps): ttr served "
        f"{len(e['layers_served'])}/{len(e['layers'])} layers ({', '.join(e['layers_served']) or 'none'}).",
        f"Prompt adherence: exact {100 * e['adherence_exact']:.1f} %, hybrid {100 * e['adherence_approx']:.1f} %"
        f" ({e['adherence_drop_points']:+.1f} points drop).",
        f"Fidelity: velocity cosine {e['velocity_cosine']:.3f} (rel. error {e['velocity_rel_error']:.3f}) per "
        f"step; trajectory PSNR {e['psnr_db']:.1f} dB.",
        f"Time per step ({e['device']}): exact {1000 * e['seconds_per_step_exact']:.0f} ms, hybrid "
        f"{1000 * e['seconds_per_step_approx']:.0f} ms (the testbed is tiny: speed claims come from "
        f"`attnplug bench` on a GPU).",
        "A CPU demo distills for minutes; docs/QUALITY.md has the numbers of longer GPU distillations "
        "(\"The default layer\"; `attnplug eval --config "
        "testbed/configs/serve_single_window.toml --checkpoint testbed/weights/ttr_window.safetensors` "
        "reproduces a committed one).",
    ]
    return "\n".join(lines)
