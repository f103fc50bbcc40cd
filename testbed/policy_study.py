"""The routing-policy study on the testbed: calibrated plan vs learned policy, with and without text features.

    python -m attnplug.testbed.policy_study --out DIR --device cuda [--train-minutes 2.5 --thresholds ...
        --eval-prompts 64 --seeds 0,1 --plan plan.json]

1. one session serving `--checkpoint` under `--config` (default: every layer of ttr_default, joint blocks too);
2. the serving plan: calibrated on training-distribution prompts (or read from `--plan`);
3. two policies trained with REINFORCE on the same episodes (their exact references shared): with the pooled
   prompt embedding, and the same network without it — same reward, same budget, same time;
4. evaluation on held-out prompts, for each seed its own prompts and noise, in batches of
   `prompts_per_episode` (each batch one run, so each gets its own routing): the exact sample, the plan's
   greedy prefixes (its Pareto curve), and every policy at every threshold; per point the share of
   layer-steps served, adherence points lost, velocity fidelity and seconds per sample (a threshold of 1.0
   serves nothing: its time against the exact run is what deciding costs);
5. `study.json`, `study.md` (the table and the headline numbers) and `pareto.png` in `--out`.

At its defaults it takes more than 10 minutes on one H200: to fit lent 10-minute calls, train in one (`--train-minutes
--no-evaluate`), train further in the next if needed (`--plan DIR/plan.json --resume DIR`), and evaluate in the
last (`--plan DIR/plan.json --policies DIR`). tests/test_policy_study.py runs it on a CPU at toy sizes.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..core.checkpoint import atomic_write_text
from ..core.quality import Sample, mean_scores
from ..plugins.controller import policy_report as report
from ..plugins.controller.plan import ServingPlan
from . import data, sampling
from .calibration import _PROMPT_STREAM, TestbedAdherence, _adherence_factory, sample_testbed
from .model import WEIGHTS_DIR, load_testbed
from .processes import run_side_by_side

CONFIGS = Path(__file__).parent / "configs"
MAX_LOSS = 1.0  # adherence points: the budget of the headline numbers
#: the two policies of a study and their files: with the pooled prompt embedding, and the same network without it
POLICY_FILES = (("policy (text)", "policy_text.safetensors", True),
                ("policy (no text)", "policy_no_text.safetensors", False))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m attnplug.testbed.policy_study", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", type=Path, default=CONFIGS / "serve_all.toml")
    p.add_argument("--checkpoint", type=Path, default=WEIGHTS_DIR / "ttr_default.safetensors")
    p.add_argument("--weights", type=Path, default=None, help="testbed model weights (default: the committed ones)")
    p.add_argument("--plan", type=Path, default=None, help="a plan JSON (skips calibration)")
    p.add_argument("--calibration-prompts", type=int, default=16)
    p.add_argument("--sigma-bands", default=None, help="comma list of σ band edges (default: the config's)")
    p.add_argument("--calibration-layers", default=None, help="comma list of layer patterns (default: the config's)")
    p.add_argument("--plan-points", type=int, default=6, help="greedy prefixes of the plan evaluated")
    p.add_argument("--policies", type=Path, default=None,
                   help="a folder holding policy_text.safetensors and policy_no_text.safetensors from an earlier "
                        "study (skips training: evaluate those)")
    p.add_argument("--resume", type=Path, default=None,
                   help="a folder holding the two policy files of an earlier study: train them further (their "
                        "optimizer, baseline and λ) instead of new ones")
    p.add_argument("--no-evaluate", action="store_true",
                   help="stop after training (plan.json, the policy files and training.json are written)")
    p.add_argument("--train-minutes", type=float, default=2.5, help="per policy")
    p.add_argument("--updates", type=int, default=None, help="cap on updates per policy")
    p.add_argument("--prompts-per-episode", type=int, default=4)
    p.add_argument("--training", action="append", default=[], metavar="FIELD=JSON",
                   help="override one field of [plugins.controller.policy_training] for both policies, e.g. "
                        "'entropy=0.05' or 'terms=[{\"kind\": \"testbed_adherence\", \"max\": 1.0}]' (repeatable)")
    p.add_argument("--pool", type=int, default=None, help="distinct training episodes (default: the config's)")
    p.add_argument("--thresholds", default="0.05,0.2,0.35,0.5,0.65,0.8,0.9,0.97,1.0")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=1,
                   help="processes side by side: the two policies train in two, the evaluation's points are split "
                        "over this many (each process samples its seeds' exact references itself)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


class FixedPrompts:
    """`sample()`: fixed prompts and noise, in batches (calibration's sampler over a model patched once)."""

    def __init__(self, model: Any, prompts: torch.Tensor, noise: torch.Tensor, steps: int, batch: int) -> None:
        self.model, self.prompts, self.noise, self.steps, self.batch = model, prompts, noise, steps, batch

    def sample(self) -> Sample:
        return sample_testbed(self.model, self.prompts, self.noise, self.steps, self.batch)


def _served_calls(session: Any) -> tuple[int, int]:
    """(calls, calls an approximate backend served) so far, over every layer."""
    calls = served = 0
    for stats in session.stats.values():
        calls += stats.calls
        served += sum(n for b, n in stats.served.items() if not session.backends.get(b).capabilities.exact)
    return calls, served


def measure(session: Any, sampler: FixedPrompts, reference: Sample | None) -> tuple[Sample, dict[str, float]]:
    """Sample once; share of calls served approximately (= share of layer-steps), seconds, and the terms."""
    c0, s0 = _served_calls(session)
    t0 = time.perf_counter()
    sample = sampler.sample()
    seconds = (time.perf_counter() - t0) / sampler.prompts.shape[0]
    session.run_end()
    c1, s1 = _served_calls(session)
    out = {"share": (s1 - s0) / max(c1 - c0, 1), "seconds": seconds}
    if reference is not None:
        from ..plugins.controller.terms import VelocityFidelity

        scores = mean_scores([TestbedAdherence(), VelocityFidelity()], sample, reference)
        out.update(loss=scores["testbed_adherence"], velocity=scores["velocity_fidelity"])
    return sample, out


def calibrate_plan(session: Any, model: Any, args: argparse.Namespace, out: Path) -> ServingPlan:
    from ..plugins.controller.calibrate import Calibrator, build_terms

    settings = session.config.sections["controller"].calibration
    update: dict[str, Any] = {"prompts": args.calibration_prompts}
    if args.sigma_bands:
        update["sigma_bands"] = [float(x) for x in args.sigma_bands.split(",")]
    if args.calibration_layers:
        update["layers"] = args.calibration_layers.split(",")
    settings = validated(settings, update, "calibration")
    n = settings.prompts
    prompts = data.train_prompts(n, grid=model.cfg.grid,
                                 generator=torch.Generator().manual_seed(settings.seed + _PROMPT_STREAM))
    noise = sampling.initial_noise(n, prompts.shape[1], seed=settings.seed + _PROMPT_STREAM)
    terms = build_terms(settings.terms, session, {"testbed_adherence": _adherence_factory})
    result = Calibrator(session, FixedPrompts(model, prompts, noise, args.steps, n), settings, terms,
                        progress=not args.no_progress).run()
    result.plan.save_json(out / "plan.json")
    return result.plan


def plan_prefixes(plan: ServingPlan, points: int) -> list[tuple[str, ServingPlan]]:
    """The plan as its search grew it: the first k accepted cells, for `points` values of k (and the whole plan)."""
    accepted = [(s["layer"], s["band"]) for s in plan.report.get("search", []) if s.get("accepted")]
    accepted = [c for c in accepted if c in set(plan.cell_list())] or plan.cell_list()
    ks = sorted({max(1, round(i * len(accepted) / points)) for i in range(1, points + 1)} | {len(accepted)})
    ks = [k for k in ks if k <= len(accepted)] if accepted else []
    return [(f"{k} cells", ServingPlan.from_cells(plan.edges, accepted[:k])) for k in ks]


def train_policy(session: Any, model: Any, args: argparse.Namespace, out: Path, plan: ServingPlan | None,
                 index: int, references: dict[int, Sample] | None = None) -> dict[str, Any]:
    """Train policy `index` of `POLICY_FILES` and save it in `out`; its entry (the policy, file, updates, seconds,
    per-update history). `references`: exact samples per episode key shared with another policy's trainer (the same
    episodes: each is sampled once), updated in place."""
    from ..plugins.controller.policy_checkpoint import save_policy
    from ..plugins.controller.reinforce import settings_json
    from ..plugins.controller.train_policy import build_trainer
    from .policy_training import TestbedEpisodes

    name, file, use_text = POLICY_FILES[index]
    base = session.config.sections["controller"].policy_training
    update: dict[str, Any] = {**training_overrides(args.training), "prompts_per_episode": args.prompts_per_episode}
    if args.pool:
        update["pool"] = args.pool
    settings = validated(base, {**update, "use_text": use_text}, "policy_training")
    episodes = TestbedEpisodes(session, settings.prompts_per_episode, seed=settings.seed, steps=args.steps, model=model)
    resume = args.resume / file if args.resume else None  # a resumed policy keeps its own start
    trainer = build_trainer(session, episodes.sample, settings, resume=resume,
                            extra_terms={"testbed_adherence": _adherence_factory}, start_plan=plan)
    if references is not None:
        trainer.references.update(references)
    result = trainer.train(episodes.sample, minutes=args.train_minutes, updates=args.updates,
                           progress=not args.no_progress)
    if references is not None:
        references.update(trainer.references)
    save_policy(out / file, trainer.policy, settings_json(settings), trainer.state())
    return {"name": name, "policy": trainer.policy, "file": str(out / file), "updates": trainer.updates,
            "start_agreement": trainer.start_agreement, "episodes": trainer.episodes,
            "seconds": round(result.seconds, 1), "history": result.history}


def train_policies(session: Any, model: Any, args: argparse.Namespace, out: Path,
                   plan: ServingPlan | None = None) -> dict[str, Any]:
    """Both policies, one after the other in this process (sharing their exact references), or with `--workers` > 1
    side by side in two processes (each policy its own; read back from their files)."""
    if args.workers > 1:
        trained = {e.pop("name"): e for e in run_side_by_side(_train_in_process, range(len(POLICY_FILES)), args, out)}
        loaded = load_policies(out, with_training=False)
        return {name: {**trained[name], "policy": loaded[name]["policy"]} for name, _, _ in POLICY_FILES}
    references: dict[int, Sample] = {}
    entries = [train_policy(session, model, args, out, plan, i, references) for i in range(len(POLICY_FILES))]
    return {e.pop("name"): e for e in entries}


def _train_in_process(index: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """`train_policy` in a process of its own (`--workers`): its entry without the policy object (the file has it)."""
    with study_session(args) as (session, model, _, _):
        plan = ServingPlan.load_json(out / "plan.json")
        entry = train_policy(session, model, args, out, plan, index)
    entry.pop("policy")
    return entry


def training_overrides(items: list[str]) -> dict[str, Any]:
    """`FIELD=JSON` strings as a dict (a value that is not JSON is taken as a string)."""
    update: dict[str, Any] = {}
    for item in items:
        field, sep, raw = item.partition("=")
        if not sep or not field:
            raise SystemExit(f"--training {item!r}: expected FIELD=JSON, e.g. entropy=0.05")
        try:
            update[field.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            update[field.strip()] = raw
    return update


def validated(base: Any, update: dict[str, Any], section: str) -> Any:
    """`base` (the config's `[plugins.controller.<section>]` settings) with the command line's `update` applied and
    validated like the config file; a refused value exits naming the section and the field."""
    from pydantic import ValidationError

    try:
        return type(base).model_validate({**base.model_dump(), **update})
    except ValidationError as err:
        raise SystemExit(f"policy_study: [plugins.controller.{section}] does not accept {update}: {err}") from None


def write_training(out: Path, policies: dict[str, Any]) -> None:
    """`training.json`: each policy's updates, seconds, start agreement and per-update metrics."""
    record = {n: {k: v for k, v in e.items() if k not in ("policy", "name")} for n, e in policies.items()}
    atomic_write_text(out / "training.json", json.dumps(record, indent=1, default=float))


def load_policies(folder: Path, with_training: bool = True) -> dict[str, Any]:
    """The two policies of an earlier study, read from `folder` (its `training.json`, when there and
    `with_training`, gives each policy's training seconds and per-update metrics)."""
    from ..plugins.controller.policy_checkpoint import load_policy

    record_file = folder / "training.json"
    trained = json.loads(record_file.read_text()) if with_training and record_file.is_file() else {}
    policies: dict[str, Any] = {}
    for name, file, _ in POLICY_FILES:
        loaded = load_policy(folder / file)  # the gate keeps exact any layer a policy does not know
        state = loaded.training
        record = trained.get(name, {})
        policies[name] = {"policy": loaded.policy, "file": str(folder / file),
                          "updates": state.updates if state else None, "episodes": state.episodes if state else None,
                          "seconds": record.get("seconds"), "history": record.get("history", [])}
    return policies


@contextlib.contextmanager
def study_session(args: argparse.Namespace) -> Iterator[tuple[Any, Any, Any, Any]]:
    """`(session, model, policy gate, plan gate)`: `--checkpoint` served under `--config` on the testbed model,
    the host patched; closed on exit."""
    from ..core import Session
    from ..core.config import load_config
    from ..hosts.diffusers import apply
    from ..plugins.controller.gate import plan_gate
    from ..plugins.controller.policy_gate import policy_gate

    cfg = load_config(args.config)
    cfg.root = cfg.root.model_copy(update={"training": False, "checkpoint": None})
    session = Session(cfg)
    session.load(args.checkpoint)
    model = load_testbed(args.device, path=args.weights)
    handle = apply(model.transformer, session)
    pgate, plgate = policy_gate(session), plan_gate(session)
    assert pgate is not None and plgate is not None
    try:
        yield session, model, pgate, plgate
    finally:
        handle.remove()
        session.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with study_session(args) as (session, model, pgate, plgate):
        t0 = time.perf_counter()
        plan = ServingPlan.load_json(args.plan) if args.plan else calibrate_plan(session, model, args, out)
        if args.plan and args.plan.resolve() != (out / "plan.json").resolve():
            plan.save_json(out / "plan.json")  # the study's folder holds everything its next call needs
        timings["plan_s"] = time.perf_counter() - t0
        print(f"plan: {timings['plan_s']:.0f} s", flush=True)  # each stage as it ends: a cut-off run still tells
        t0 = time.perf_counter()
        policies = (load_policies(args.policies) if args.policies
                    else train_policies(session, model, args, out, plan))
        timings["train_s"] = time.perf_counter() - t0
        print(f"policies: {timings['train_s']:.0f} s", flush=True)
        if not args.policies:
            write_training(out, policies)
        if args.no_evaluate:
            return {"policies": policies, "timings": timings}
        t0 = time.perf_counter()
        jobs = evaluation_jobs(args, plan, policies)
        if args.workers > 1:
            folder = args.policies or out
            pieces = [jobs[i * len(jobs) // args.workers:(i + 1) * len(jobs) // args.workers]
                      for i in range(min(args.workers, len(jobs)))]  # contiguous: each process few seeds
            done = run_side_by_side(_evaluate_in_process, [p for p in pieces if p], args, out / "plan.json", folder)
            rows = merged_rows(jobs, [row for part in done for row in part])
        else:
            rows = evaluate(session, model, args, plan, policies, pgate, plgate, jobs)
        timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    return summarize(args, plan, policies, rows, timings, out)


#: one point of the evaluation: (seed, method, setting, threshold — None for a prefix of the plan)
Job = tuple[int, str, str, "float | None"]


def evaluation_jobs(args: argparse.Namespace, plan: ServingPlan, policies: dict[str, Any]) -> list[Job]:
    """Every point of the evaluation, seed by seed: the plan's greedy prefixes, then each policy at each threshold."""
    thresholds = [float(t) for t in args.thresholds.split(",")]
    jobs: list[Job] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        jobs += [(seed, "plan", setting, None) for setting, _ in plan_prefixes(plan, args.plan_points)]
        jobs += [(seed, name, f"threshold {t:g}", t) for name in policies for t in thresholds]
    return jobs


def evaluate(session: Any, model: Any, args: argparse.Namespace, plan: ServingPlan, policies: dict[str, Any],
             pgate: Any, plgate: Any, jobs: list[Job]) -> list[dict[str, Any]]:
    """The rows of `jobs`, and before each seed's first one that seed's exact row (its reference)."""
    prefixes = dict(plan_prefixes(plan, args.plan_points))
    rows: list[dict[str, Any]] = []
    seed_now: int | None = None
    for seed, method, setting, threshold in jobs:
        if seed != seed_now:
            seed_now = seed
            prompts = data.heldout_prompts(args.eval_prompts, grid=model.cfg.grid, seed=1234 + seed)
            noise = sampling.initial_noise(args.eval_prompts, prompts.shape[1], seed=seed)
            sampler = FixedPrompts(model, prompts, noise, args.steps, args.prompts_per_episode)
            with pgate.exact():
                reference, exact = measure(session, sampler, None)
            rows.append({"method": "exact", "setting": "-", "seed": seed, "share": 0.0, "loss": 0.0,
                         "velocity": 0.0, "seconds": exact["seconds"]})
        if threshold is None:
            plgate.candidate = prefixes[setting]
            session.router.invalidate()
        else:
            pgate.set_policy(policies[method]["policy"], mode="threshold", threshold=threshold)
        try:
            rows.append({"method": method, "setting": setting, "seed": seed,
                         **measure(session, sampler, reference)[1]})
        finally:
            plgate.candidate = None
            pgate.set_policy(None)
    return rows


def _evaluate_in_process(jobs: list[Job], args: argparse.Namespace, plan_file: Path,
                         folder: Path) -> list[dict[str, Any]]:
    """`evaluate` of some jobs in a process of its own (`--workers`), the plan and policies read from their files."""
    with study_session(args) as (session, model, pgate, plgate):
        return evaluate(session, model, args, ServingPlan.load_json(plan_file), load_policies(folder), pgate,
                        plgate, jobs)


def merged_rows(jobs: list[Job], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of several processes in the order one process gives them: per seed its exact row (the first
    process's, when several sampled it), then the jobs' rows in `jobs` order."""
    order = {(seed, method, setting): i for i, (seed, method, setting, _) in enumerate(jobs)}
    exact: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["method"] == "exact":
            exact.setdefault(row["seed"], row)
    points = sorted((r for r in rows if r["method"] != "exact"),
                    key=lambda r: order[(r["seed"], r["method"], r["setting"])])
    merged: list[dict[str, Any]] = []
    for row in points:
        if exact.get(row["seed"]) is not None:
            merged.append(exact.pop(row["seed"]))
        merged.append(row)
    return merged


def summarize(args: argparse.Namespace, plan: ServingPlan, policies: dict[str, Any], rows: list[dict[str, Any]],
              timings: dict[str, float], out: Path) -> dict[str, Any]:
    means = report.mean_points([r for r in rows if r["method"] != "exact"])
    points = {m: [(p["share"], p["loss"]) for p in pts] for m, pts in means.items()}
    headline: dict[str, Any] = {}
    for method, pts in points.items():
        per_seed = {}
        for seed in sorted({r["seed"] for r in rows}):
            mine = [(r["share"], r["loss"]) for r in rows if r["method"] == method and r["seed"] == seed]
            per_seed[str(seed)] = report.best_share(mine, MAX_LOSS)
        headline[method] = {"best_share_within_budget_mean": report.best_share(pts, MAX_LOSS),
                            "best_share_within_budget_per_seed": per_seed, "front": report.pareto(pts)}
    plan_front = report.pareto(points.get("plan", []))
    for name in policies:
        headline[name]["dominates_plan"] = report.dominates(report.pareto(points.get(name, [])), plan_front)
    exact_s = [r["seconds"] for r in rows if r["method"] == "exact"]
    idle = [r["seconds"] for r in rows if r["method"].startswith("policy") and r["setting"] == "threshold 1"]
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"), "device": args.device,
        "config": str(args.config), "checkpoint": str(args.checkpoint), "steps": args.steps,
        "eval_prompts": args.eval_prompts, "seeds": args.seeds, "max_loss_points": MAX_LOSS,
        "plan": {"cells": len(plan.cell_list()), "share_at_calibration": plan.report.get("share_served"),
                 "describe": plan.describe()},
        "policies": {n: {k: v for k, v in e.items() if k not in ("policy", "history")} |
                     {"last": e["history"][-1] if e["history"] else {}} for n, e in policies.items()},
        "headline": headline, "timings": {k: round(v, 1) for k, v in timings.items()},
        "seconds_per_sample": {"exact": _mean(exact_s), "policy deciding, nothing served": _mean(idle)},
        "rows": rows,
    }
    atomic_write_text(out / "study.json", json.dumps(result, indent=1, default=float))
    report.plot_pareto([r for r in rows if r["method"] != "exact"], out / "pareto.png", MAX_LOSS)
    atomic_write_text(out / "study.md", markdown(result))
    return result


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Routing-policy study ({result['date']}, {result['device']})", "",
             f"{result['eval_prompts']} held-out prompts per seed (seeds {result['seeds']}), {result['steps']} steps; "
             f"config {result['config']}, checkpoint {result['checkpoint']}.", "",
             f"| method | best share served at ≤ {result['max_loss_points']:g} point lost (mean of seeds) | per seed | "
             "Pareto front dominates the plan's |", "|---|---|---|---|"]
    for method, h in result["headline"].items():
        best = h["best_share_within_budget_mean"]
        seeds = ", ".join("—" if v is None else f"{100 * v:.1f} %" for v in h["best_share_within_budget_per_seed"].values())
        lines.append(f"| {method} | {'—' if best is None else f'{100 * best:.1f} %'} | {seeds} | "
                     f"{h.get('dominates_plan', '—')} |")
    sps = result["seconds_per_sample"]
    lines += ["", f"seconds per sample: exact {_fmt(sps['exact'])}, policy deciding but serving nothing "
                  f"{_fmt(sps['policy deciding, nothing served'])}", "",
              "timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings"].items()), "",
              report.markdown_table(result["rows"]), ""]
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4f}"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.resume and args.policies:
        raise SystemExit("policy_study: give --resume (train further) or --policies (evaluate only), not both")
    result = run(args)
    if args.no_evaluate:
        for name, entry in result["policies"].items():
            last = entry["history"][-1] if entry["history"] else {}
            print(f"{name}: {entry['updates']} updates; last: share {last.get('share_served', float('nan')):.3f}, "
                  f"cost {last.get('cost', float('nan')):.3f}, λ {last.get('lambda', float('nan')):.2f}")
        print(f"written: {args.out}/plan.json, training.json, {', '.join(f for _, f, _ in POLICY_FILES)}")
        return 0
    print(markdown({k: v for k, v in result.items()}).split("\n\n| method | setting")[0])
    print(f"written: {args.out}/study.json, study.md, pareto.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
