"""Train the testbed model by flow matching: `python -m attnplug.testbed.train --out DIR --steps N`.

Rectified flow in the Flux convention: x_t = (1 - s) x0 + s * noise, target velocity = noise - x0,
loss = MSE. s is drawn logit-normal (sigmoid of N(0, 1), as in SD3), which concentrates training
on the middle of the trajectory where the layout of the digits is decided. Batches are fresh
mosaics of training prompts (held-out prompts are never drawn) built from the train split of the
digit images, with a light gain jitter. AdamW, one-cycle LR (30 % cosine warm-up from lr/25, cosine
decay to lr/1e4), gradient clipping 1.0, bf16 autocast on CUDA, an EMA of the weights (saved).
cuDNN's SDPA backward failed for head_dim 32 in bf16 (torch 2.11, cuDNN 9.19 on an H200), so
the cuDNN SDPA backend is switched off while training. `--time-budget-s` shortens the run (number of
steps fixed after a short timing, before the LR decays) so that it ends inside a device lease.

Writes to --out: `testbed.safetensors` (fp16, EMA weights), `config.json` (arguments, model config,
loss curve, evaluation), `MODEL_CARD.md`. At the end it samples held-out prompts with the 20-step
Euler sampler from the saved fp16 file and reports prompt adherence.

`--testbed NAME` trains a testbed of the registry (`registry.py`: its grid and its recipe's steps, batch, lr,
warm-up, minutes and starting weights are then the defaults of those options); `--init-from NAME|FILE` starts
from a trained model of the family (transformer and class embeddings copied; on another grid every cell
embedding starts at that model's mean one — the larger grid's cells are learnt, not read: registry.py).
`--estimate` times a few steps here and prints the recipe's minutes on an H200, scaled from the default
testbed's measured rate (see `estimate`).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import classifier, data, sampling
from .model import TestbedConfig, TestbedModel

WEIGHTS_NAME = "testbed.safetensors"
#: The default testbed's measured training rate on one H200 (weights/MODEL_CARD.md: batch 128, 12.8 steps/s),
#: in samples per second: `estimate` scales it by the CPU cost of a sample here against the default's.
H200_DEFAULT_SAMPLES_PER_S = 128 * 12.8
CPU_SUBSET_PROMPTS = 4  # card's CPU subset: first 4 held-out prompts, noise seed 0, 20 steps; the CPU test runs it


def one_cycle_lr(step: int, total: int, lr: float, pct_start: float = 0.3, div: float = 25.0,
                 final_div: float = 1e4) -> float:
    """One-cycle LR as a pure function of the step: the shape of torch's OneCycleLR (cosine, two phases,
    lr/div -> lr -> lr/div/final_div), with the phases ending at step pct*total and total (torch: one step
    earlier), so it can follow a `total` that the time budget shortens mid-run."""
    up = max(1, int(pct_start * total))
    if step < up:
        a, b, t = lr / div, lr, step / up
    else:
        a, b, t = lr, lr / div / final_div, min(1.0, (step - up) / max(1, total - up))
    return b + (a - b) * (1 + math.cos(math.pi * t)) / 2


def sample_sigmas(n: int, generator: torch.Generator, device: torch.device, kind: str = "logit_normal") -> torch.Tensor:
    """Training noise levels [n] in (0, 1): 'logit_normal' (sigmoid N(0,1)) or 'uniform'."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device).clamp(1e-4, 1 - 1e-4)
    raise ValueError(f"--sigma-sampling must be 'logit_normal' or 'uniform', got {kind!r}")


def evaluate_adherence(model: sampling.VelocityModel, n_prompts: int = 64, steps: int = 20, seed: int = 0,
                       grid: int = data.DEFAULT_GRID, batch_size: int | None = 64,
                       prompt_seed: int = 1234) -> dict[str, Any]:
    """Adherence of `steps`-step Euler samples on the first `n_prompts` held-out prompts (noise `seed`).

    Returns prompts, cells, steps, noise_seed, adherence, min_prompt_adherence, sample_wall_s and the
    images [n, 1, 8G, 8G] (key `images`).
    """
    prompts = data.heldout_prompts(n_prompts, grid, seed=prompt_seed)
    t0 = time.perf_counter()
    imgs = sampling.sample(model, prompts, steps=steps, seed=seed, batch_size=batch_size)
    wall = time.perf_counter() - t0
    per = classifier.adherence_per_prompt(imgs, prompts)
    return {"prompts": n_prompts, "cells": n_prompts * grid * grid, "steps": steps, "noise_seed": seed,
            "adherence": float(per.mean()), "min_prompt_adherence": float(per.min()),
            "sample_wall_s": wall, "images": imgs}


def train(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN SDPA backward fails for head_dim 32 in bf16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = TestbedConfig(grid=args.grid)
    model = TestbedModel(cfg)
    if args.init_from:
        init_from(model, args.init_from)
    model = model.to(device).train()
    n_params = model.num_parameters()
    ema = [p.detach().clone().float() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    split = data.digit_split("train").to(device)
    g_cpu = torch.Generator().manual_seed(args.seed)
    g_dev = torch.Generator(device=device).manual_seed(args.seed + 1)
    total = args.steps
    print(f"[train] device={device} ({torch.cuda.get_device_name(device) if cuda else platform.processor()}) "
          f"params={n_params} steps={total} batch={args.batch} lr={args.lr}", flush=True)
    losses: list[tuple[int, float]] = []
    acc = torch.zeros((), device=device)
    acc_n = 0
    t_start = time.perf_counter()
    t_calib = None
    step = 0
    while step < total:
        lr = one_cycle_lr(step, total, args.lr, pct_start=args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        prompts = data.train_prompts(args.batch, cfg.grid, g_cpu).to(device, non_blocking=True)
        x0 = data.pack(data.render_mosaics(prompts, split, g_dev, args.gain_jitter))
        noise = torch.randn(x0.shape, generator=g_dev, device=device)
        s = sample_sigmas(args.batch, g_dev, device, args.sigma_sampling)
        x_t = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            v = model.velocity(x_t, s, prompts)
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            params = [p.detach().float() for p in model.parameters()]
            torch._foreach_lerp_(ema, params, 1 - decay)
        acc += loss.detach()
        acc_n += 1
        step += 1
        if step == 20:
            if cuda:
                torch.cuda.synchronize()
            t_calib = time.perf_counter()
        if step == 120 and args.time_budget_s and t_calib is not None:
            if cuda:
                torch.cuda.synchronize()
            rate = 100 / (time.perf_counter() - t_calib)
            fit = int((args.time_budget_s - (time.perf_counter() - t_start)) * rate) + step
            if fit < total:
                print(f"[train] {rate:.1f} steps/s: time budget {args.time_budget_s:.0f} s fits {fit} steps, "
                      f"not {total}; shortening the schedule", flush=True)
                total = max(step + 1, fit)
        if step % args.log_every == 0 or step == total:
            mean = float(acc / acc_n)
            losses.append((step, mean))
            acc.zero_()
            acc_n = 0
            el = time.perf_counter() - t_start
            print(f"[train] step {step}/{total} loss {mean:.4f} lr {lr:.2e} {el:.0f}s", flush=True)
    if cuda:
        torch.cuda.synchronize()
    train_wall = time.perf_counter() - t_start
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e)
    model.eval()
    weights = out / WEIGHTS_NAME
    info = {"seed": args.seed, "steps": total, "steps_requested": args.steps, "batch": args.batch,
            "final_loss": losses[-1][1] if losses else None, "train_wall_s": round(train_wall, 1),
            "params": n_params, "weights": "EMA", "testbed": args.testbed, "init_from": args.init_from}
    model.save(weights, extra_meta={"training": info})
    # evaluate the artifact as it will be committed: the fp16 file, loaded in fp32
    loaded = TestbedModel.load(weights, device=device, dtype=torch.float32)
    ev = evaluate_adherence(loaded, args.eval_prompts, args.eval_steps, grid=cfg.grid, batch_size=args.eval_batch)
    sub = (evaluate_adherence(loaded, CPU_SUBSET_PROMPTS, args.eval_steps, grid=cfg.grid) if args.subset_eval
           else {"prompts": 0, "cells": 0, "adherence": None, "min_prompt_adherence": None, "images": None})
    clf_acc = classifier.heldout_accuracy()
    imgs = ev.pop("images")
    sub.pop("images")
    print(f"[eval] held-out adherence {ev['adherence'] * 100:.2f} % on {ev['cells']} cells "
          f"(min per prompt {ev['min_prompt_adherence'] * 100:.1f} %); CPU-test subset {_pct(sub['adherence'])}; "
          f"classifier held-out accuracy {clf_acc * 100:.2f} %", flush=True)
    record = {"command": "python -m attnplug.testbed.train " + shlex.join(args.argv),
              "args": vars(args), "model_config": cfg.to_dict(), "training": info, "loss_curve": losses,
              "eval": ev, "eval_cpu_subset": sub, "classifier_heldout_accuracy": clf_acc,
              "environment": {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
                              "torch": torch.__version__, "diffusers": _version("diffusers"),
                              "python": platform.python_version()}}
    (out / "config.json").write_text(json.dumps(record, indent=1))
    (out / "MODEL_CARD.md").write_text(model_card(record, weights))
    if args.save_samples:
        from safetensors.torch import save_file

        save_file({"images": imgs[:16].half().contiguous()}, str(out / "samples.safetensors"))
    return record


def init_from(model: TestbedModel, source: str) -> None:
    """Start `model` from a trained model of the family: a registry name or a weights file. The transformer and
    the class embeddings and pooling are copied (same architecture required); the cell embeddings are copied when
    the grids match, else every cell starts at the source's mean cell embedding."""
    from .registry import TESTBEDS

    src = TestbedModel.load(TESTBEDS[source].require_weights() if source in TESTBEDS else source)
    if (src.cfg.num_layers, src.cfg.num_single_layers, src.cfg.num_attention_heads, src.cfg.attention_head_dim,
            src.cfg.joint_attention_dim) != (model.cfg.num_layers, model.cfg.num_single_layers,
                                             model.cfg.num_attention_heads, model.cfg.attention_head_dim,
                                             model.cfg.joint_attention_dim):
        raise ValueError(f"--init-from {source}: another architecture ({src.cfg}) than {model.cfg}")
    with torch.no_grad():
        model.transformer.load_state_dict(src.transformer.state_dict())
        model.cond.class_emb.load_state_dict(src.cond.class_emb.state_dict())
        model.cond.pool.load_state_dict(src.cond.pool.state_dict())
        cells = src.cond.cell_emb.weight
        model.cond.cell_emb.weight.copy_(cells if cells.shape == model.cond.cell_emb.weight.shape
                                         else cells.mean(0, keepdim=True).expand_as(model.cond.cell_emb.weight))


def cpu_seconds_per_sample(grid: int, batch: int = 2, steps: int = 3, device: str = "cpu") -> float:
    """Seconds of one training step per sample at `grid` (fastest of `steps` after one warm-up step)."""
    model = TestbedModel(TestbedConfig(grid=grid)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    split = data.digit_split("train").to(device)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        prompts = data.train_prompts(batch, grid, g).to(device)
        x0 = data.pack(data.render_mosaics(prompts, split, None, 0.1))
        noise = torch.randn_like(x0)
        s = torch.rand(batch, device=device)
        loss = torch.nn.functional.mse_loss(model.velocity((1 - s[:, None, None]) * x0 + s[:, None, None] * noise,
                                                           s, prompts), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return min(times) / batch


def estimate(testbed: str, batch: int = 2, steps: int = 3) -> dict[str, Any]:
    """The H200 minutes of `testbed`'s recipe, estimated: the CPU cost of a training sample at its size over the
    default testbed's (`ratio`) divides the default's measured H200 rate (`H200_DEFAULT_SAMPLES_PER_S`). The GPU
    was far from busy on the default's small kernels, so the estimate errs long for the larger sizes (their
    kernels fill it better) — as long as attention's quadratic cost is no larger a share there than on a CPU."""
    from .registry import get_testbed

    bed, base = get_testbed(testbed), get_testbed("default")
    here = cpu_seconds_per_sample(bed.grid, batch, steps)
    ref = cpu_seconds_per_sample(base.grid, batch * max(1, (bed.grid // base.grid) ** 2), steps)
    ratio = here / ref
    rate = H200_DEFAULT_SAMPLES_PER_S / ratio
    r = bed.recipe
    return {"testbed": testbed, "cpu_s_per_sample": here, "default_cpu_s_per_sample": ref, "ratio": ratio,
            "h200_samples_per_s": rate, "recipe_steps": r.steps, "recipe_batch": r.batch,
            "recipe_minutes_estimated": r.steps * r.batch / rate / 60, "recipe_minutes_budget": r.minutes}


def _pct(x: float | None, digits: int = 2) -> str:
    return "not run" if x is None else f"{x * 100:.{digits}f} %"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def model_card(r: dict[str, Any], weights: Path) -> str:
    """The model card (markdown) for a training record."""
    t, ev, sub, mc = r["training"], r["eval"], r["eval_cpu_subset"], r["model_config"]
    size_mb = weights.stat().st_size / 1e6
    curve = ", ".join(f"{s}: {l:.3f}" for s, l in r["loss_curve"][:: max(1, len(r["loss_curve"]) // 10)])
    name = t.get("testbed") or "default"
    g = mc["grid"]
    start = f"started from `{t['init_from']}`" if t.get("init_from") else "from scratch"
    return f"""# attnplug testbed model: `{name}`

A diffusers `FluxTransformer2DModel` trained by flow matching on {g}x{g} mosaics of scikit-learn digits
(see `attnplug/testbed/__init__.py`, `attnplug/testbed/registry.py`). Load it with
`attnplug.testbed.model.load_testbed(testbed="{name}")`; `attnplug eval --testbed {name}` evaluates on it.

| | |
|---|---|
| architecture | {mc['num_layers']} double + {mc['num_single_layers']} single blocks, {mc['num_attention_heads']} heads x {mc['attention_head_dim']}, joint dim {mc['joint_attention_dim']}, RoPE axes {mc['axes_dims_rope']}, in_channels 4 (2x2 packed pixels) |
| parameters | {t['params']:,} (transformer + conditioning embedder) |
| data | grid {mc['grid']}x{mc['grid']} -> {(mc['grid'] * 4) ** 2} image tokens + {mc['grid'] ** 2} conditioning tokens; train split of the digit images; held-out prompts never drawn |
| objective | rectified flow, x_t = (1-s) x0 + s noise, target noise - x0, s ~ logit-normal(0, 1) |
| optimiser | AdamW lr {r['args']['lr']}, wd {r['args']['weight_decay']}, one-cycle (warm-up {r['args'].get('warmup', 0.3):g}), batch {t['batch']}, grad clip 1.0, bf16 autocast, EMA {r['args']['ema']} (saved weights) |
| seed | {t['seed']} ({start}) |
| steps | {t['steps']} (requested {t['steps_requested']}) |
| final loss | {t['final_loss']:.4f} (mean of the last {r['args']['log_every']} steps) |
| training wall time | {t['train_wall_s']:.0f} s on {r['environment']['device']} |
| file | `{weights.name}`, fp16, {size_mb:.1f} MB |
| environment | torch {r['environment']['torch']}, diffusers {r['environment']['diffusers']}, python {r['environment']['python']} |

## Evaluation (the fp16 file, loaded in fp32; {ev['steps']}-step Euler, shift 1)

| set | prompts | cells | adherence | min per prompt |
|---|---|---|---|---|
| held-out prompts (seed 1234), noise seed {ev['noise_seed']} | {ev['prompts']} | {ev['cells']} | **{ev['adherence'] * 100:.2f} %** | {ev['min_prompt_adherence'] * 100:.1f} % |
| CPU-test subset (first {sub['prompts']}) | {sub['prompts']} | {sub['cells']} | {_pct(sub['adherence'])} | {_pct(sub['min_prompt_adherence'], 1)} |

Digit classifier (SVC gamma 0.001, C 10) on held-out digit images: {r['classifier_heldout_accuracy'] * 100:.2f} %.

Loss curve (step: loss): {curve}

## Exact training command

```
{r['command']}
```
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m attnplug.testbed.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output folder (required unless --estimate)")
    p.add_argument("--testbed", default=None, help="a testbed of the registry (default, grid64, grid128): its grid "
                                                    "and recipe set the defaults below")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's (6000 for the default testbed)")
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's (128)")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's (3e-4)")
    p.add_argument("--warmup", type=float, default=None, help="share of the steps warming up (default: the recipe's, 0.3)")
    p.add_argument("--init-from", default=None, help="a testbed name or weights file to start from (default: the "
                                                     "recipe's first trained one; none for the default testbed)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the saved weights (default: the recipe's, "
                                                           "0.999)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=int, default=None, help="cells per side (default: the testbed's, 8)")
    p.add_argument("--gain-jitter", type=float, default=0.1)
    p.add_argument("--sigma-sampling", choices=["logit_normal", "uniform"], default="logit_normal")
    p.add_argument("--time-budget-s", type=float, default=0.0, help="shorten the schedule to fit (0: off)")
    p.add_argument("--minutes", type=float, default=None,
                   help="the same budget in minutes (default: the recipe's; 0: off)")
    p.add_argument("--eval-prompts", type=int, default=None, help="default: the recipe's (64)")
    p.add_argument("--eval-batch", type=int, default=None, help="held-out prompts sampled together (recipe: 64)")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--device", default=None)
    p.add_argument("--no-subset-eval", dest="subset_eval", action="store_false",
                   help="skip the evaluation of the CPU-test subset (first 4 held-out prompts)")
    p.add_argument("--save-samples", action="store_true", help="also write samples.safetensors (16 held-out samples)")
    p.add_argument("--estimate", action="store_true", help="only time a few steps here and print the recipe's "
                                                           "estimated H200 minutes")
    ns = p.parse_args(argv)
    ns.argv = list(sys.argv[1:] if argv is None else argv)  # for the model card's exact command
    from .registry import get_testbed

    try:
        bed = get_testbed(ns.testbed)
    except ValueError as exc:
        p.error(f"--testbed: {exc}")
    if ns.grid is not None and ns.testbed is not None and ns.grid != bed.grid:
        p.error(f"--grid {ns.grid}: testbed {bed.name!r} has grid {bed.grid}")
    r = bed.recipe
    for name, value in (("steps", r.steps), ("batch", r.batch), ("lr", r.lr), ("warmup", r.warmup),
                        ("init_from", r.start_from()), ("grid", bed.grid), ("ema", r.ema), ("eval_prompts", r.eval_prompts),
                        ("eval_batch", r.eval_batch), ("minutes", r.minutes)):
        if getattr(ns, name) is None:
            setattr(ns, name, value)
    if ns.minutes and not ns.time_budget_s:
        ns.time_budget_s = 60.0 * ns.minutes
    if ns.out is None and not ns.estimate:
        p.error("--out is required")
    return ns


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.estimate:
        print(json.dumps(estimate(args.testbed or "default"), indent=1))
        return
    train(args)


if __name__ == "__main__":
    main()
