"""The `attnplug` command line: plugins, config, and the jobs later modules add (demo, eval, bench).

Expected errors (a bad config or checkpoint, a bad argument, no GPU for `--device cuda`, an output path that
cannot be written) exit with status 2 and one line naming the problem, before any work starts; a traceback
means a bug. Results are printed before they are written to a file, so a finished run is never lost.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer

app = typer.Typer(help="attnplug: swap and learn the attention of diffusion transformers.", no_args_is_help=True,
                  add_completion=False)
plugins_app = typer.Typer(help="Inspect plugins.", no_args_is_help=True)
config_app = typer.Typer(help="Validate configs and print their schema.", no_args_is_help=True)
app.add_typer(plugins_app, name="plugins")
app.add_typer(config_app, name="config")
controller_app = typer.Typer(help="The controller: train a routing policy.", no_args_is_help=True)
app.add_typer(controller_app, name="controller")


#: Seeds of the testbed jobs (prompts, noise and the distiller derive their own seeds from it).
MAX_SEED = 2**32 - 1


class UsageProblem(Exception):
    """A bad argument of a command; reported as one line, exit status 2."""


def fail(command: str, message: str) -> "typer.Exit":
    """Print `attnplug <command>: <message>` on stderr; return the exit (status 2) to raise."""
    typer.echo(f"attnplug {command}: {message}", err=True)
    return typer.Exit(2)


@contextmanager
def expected_errors(command: str) -> Iterator[None]:
    """Turn the errors a user can cause (config, checkpoint, arguments, files) into one line and exit 2."""
    from .core.checkpoint import CheckpointError
    from .core.config import ConfigError

    try:
        yield
    except (ConfigError, CheckpointError, UsageProblem) as exc:
        raise fail(command, str(exc)) from None
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        raise fail(command, f"{where}{exc.strerror or exc}") from None


def check_device(device: str) -> None:
    """`--device`: 'cpu', 'cuda' or 'cuda:N', and a GPU must be there for 'cuda'."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageProblem(f"--device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageProblem(f"--device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU visible"
            raise UsageProblem(f"--device {device}: CUDA is not available here ({build}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageProblem(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")


def check_range(option: str, value: int | None, lo: int, hi: int | None = None) -> None:
    """An integer option within [lo, hi] (None: not given)."""
    if value is not None and (value < lo or (hi is not None and value > hi)):
        raise UsageProblem(f"{option} {value}: expected an integer " + (f"in [{lo}, {hi}]" if hi is not None
                                                                          else f">= {lo}"))


def output_file_problem(path: Path) -> str | None:
    """Why a result could not be written to `path` (checked before the run), or None. Creates its folder."""
    if path.exists() and not path.is_file():
        return f"{path} is a folder or not a regular file; give a file path (e.g. {path / 'result.json'})"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create the folder {path.parent}: {exc.strerror or exc}"
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{path} cannot be written (permissions)"
    return None


def check_output(option: str, path: Path | None) -> None:
    if path is not None:
        problem = output_file_problem(path)
        if problem:
            raise UsageProblem(f"{option}: {problem}")


def testbed_layer_keys() -> list[str]:
    """The attention layers of the committed testbed model (from its architecture; no weights loaded)."""
    from .testbed.model import TestbedConfig

    return TestbedConfig().layer_keys()


TESTBED_HELP = ("The testbed (testbed/registry.py): 'default' (1 024 image tokens), 'grid64' (4 096), "
                "'grid128' (16 384).")


def check_testbed(name: str) -> None:
    """`--testbed`: a name of the registry whose weights are there (else one line: how to train them)."""
    from .testbed.registry import get_testbed

    try:
        bed = get_testbed(name)
    except ValueError as exc:
        raise UsageProblem(f"--testbed: {exc}") from None
    bed.require_weights()  # TestbedMissing (an OSError): "train it with: ..."


@plugins_app.command("list")
def plugins_list(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Every plugin: name, version, origin (built-in / entry point / blocked / failed) and what it registers."""
    from .core.plugins import get_plugins

    infos = get_plugins().describe()
    if as_json:
        typer.echo(json.dumps([i.__dict__ for i in infos], indent=2))
        return
    for info in infos:
        line = f"{info.name:<16} {info.version:<10} {info.origin}"
        if info.error:
            line += f" — {info.error}"
        typer.echo(line)
        for family, names in sorted(info.registers.items()):
            typer.echo(f"    {family}: {', '.join(names)}")


@config_app.command("validate")
def config_validate(path: Path = typer.Argument(..., help="Config file (.toml or .json)."),
                    layers: str | None = typer.Option(
                        None, help="The model's attention layers, to warn about layer patterns that match none: "
                                   "'testbed', or a comma list of layer keys ('double:0,single:0,...').")) -> None:
    """Validate a config file; exit 0 when valid (warnings on stderr), 2 with every problem named when not."""
    from .core.config import ConfigError, load_config

    keys = None
    if layers is not None:
        keys = testbed_layer_keys() if layers == "testbed" else [k.strip() for k in layers.split(",") if k.strip()]
    try:
        cfg = load_config(path, layers=keys)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for warning in cfg.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"{path}: valid (backend={cfg.root.backend}, exact={cfg.root.exact}, gates="
               f"{[g.kind for g in cfg.gates]}, sections={sorted(cfg.sections)})")


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of the whole config (root, plugin sections, gate and logger kinds)."""
    from .core.config import config_json_schema

    typer.echo(json.dumps(config_json_schema(), indent=2))


@app.command("demo")
def demo(out: Path = typer.Option(Path("attnplug-demo"), help="Report folder (created)."),
         device: str = typer.Option("cpu", help="'cpu' or 'cuda'."),
         config: Path | None = typer.Option(None, help="Distillation config (default: the bundled demo config)."),
         quick: bool = typer.Option(False, help="Reduced mode (a smoke test; numbers are not meaningful)."),
         runs: int | None = typer.Option(None, help="Sampling runs to distill over."),
         prompts_per_run: int | None = typer.Option(None, help="Prompts sampled together in one run."),
         steps: int | None = typer.Option(None, help="Euler steps of each distillation run."),
         eval_prompts: int | None = typer.Option(None, help="Held-out prompts for the comparison."),
         eval_steps: int | None = typer.Option(None, help="Euler steps of the comparison."),
         seed: int = typer.Option(0, help="Seed of prompts, noise and the distiller."),
         resume: Path | None = typer.Option(None, help="Checkpoint to continue distilling from."),
         testbed: str = typer.Option("default", help=TESTBED_HELP)) -> None:
    """The main job: distill ttr online on the testbed, then compare exact vs hybrid attention."""
    with expected_errors("demo"):
        from .testbed.demo import DemoPlan, describe, run_demo

        plan = DemoPlan.quick() if quick else DemoPlan()
        for name, value in (("runs", runs), ("prompts_per_run", prompts_per_run), ("steps", steps),
                            ("eval_prompts", eval_prompts), ("eval_steps", eval_steps)):
            check_range(f"--{name.replace('_', '-')}", value, 1)
            if value is not None:
                setattr(plan, name, value)
        check_range("--seed", seed, 0, MAX_SEED)
        check_device(device)
        if resume is not None and not resume.is_file():
            raise UsageProblem(f"--resume {resume}: no checkpoint file there")
        check_testbed(testbed)
        metrics = run_demo(out, device=device, config=config, plan=plan, seed=seed, resume=resume, testbed=testbed)
    typer.echo(describe(metrics))
    typer.echo(f"report: {out}/ (metrics.json, ttr.safetensors, samples.png, distill.png, distill.jsonl)")


@app.command("eval")
def evaluate_cmd(config: Path = typer.Option(..., help="Config to evaluate (training is forced off)."),
                 checkpoint: Path | None = typer.Option(None, help="Checkpoint to load."),
                 prompts: int = typer.Option(16, help="Held-out prompts."),
                 steps: int = typer.Option(20, help="Euler steps."),
                 seed: int = typer.Option(0, help="Seed of prompts and noise."),
                 device: str = typer.Option("cpu", help="'cpu' or 'cuda'."),
                 json_out: Path | None = typer.Option(None, "--json", help="Write the metrics here."),
                 testbed: str = typer.Option("default", help=TESTBED_HELP + " A checkpoint distilled on another "
                                             "testbed of the family serves here (resolution transfer)."),
                 step_cache: str | None = typer.Option(None, help="'fbcache:THRESHOLD': diffusers' First Block Cache "
                                                       "on the evaluated model too; reports the steps it skipped.")
                 ) -> None:
    """Evaluate a config/checkpoint on the testbed: adherence, fidelity, layers served, time per step."""
    with expected_errors("eval"):
        from .testbed.evaluate import evaluate, strip_images
        from .testbed.step_cache import StepCacheError, available, parse_step_cache

        check_range("--prompts", prompts, 1)
        check_range("--steps", steps, 1)
        check_range("--seed", seed, 0, MAX_SEED)
        check_device(device)
        check_output("--json", json_out)
        check_testbed(testbed)
        if step_cache is not None:
            try:
                parse_step_cache(step_cache)
            except StepCacheError as exc:
                raise UsageProblem(str(exc)) from None
            if available():
                raise UsageProblem(f"--step-cache: {available()}")
        result = strip_images(evaluate(config, checkpoint, n_prompts=prompts, steps=steps, seed=seed,
                                       device=device, testbed=testbed, step_cache=step_cache))
    text = json.dumps(result, indent=2)
    typer.echo(text)  # printed first: a failing write below loses nothing
    if json_out is not None:
        with expected_errors("eval"):
            json_out.write_text(text)


@app.command("calibrate")
def calibrate_cmd(config: Path = typer.Option(..., help="Serving config of the checkpoint; its "
                                              "[plugins.controller.calibration] section sets prompts, σ bands, terms."),
                  checkpoint: Path = typer.Option(..., help="Checkpoint to calibrate (the plan is stored in it)."),
                  out: Path = typer.Option(Path("attnplug-calibration"), help="Report folder (created)."),
                  pipeline: str | None = typer.Option(None, help="A diffusers pipeline (local folder or hub id in "
                                                                 "the local cache) instead of the testbed."),
                  prompts_file: Path | None = typer.Option(None, help="JSON list of prompt strings (with --pipeline)."),
                  prompts: int | None = typer.Option(None, help="Calibration prompts (default: the config's)."),
                  steps: int = typer.Option(20, help="Sampler steps."),
                  device: str = typer.Option("cpu", help="'cpu' or 'cuda'."),
                  dtype: str = typer.Option("bfloat16", help="Pipeline dtype (with --pipeline)."),
                  height: int = typer.Option(1024, help="Image height (with --pipeline)."),
                  width: int = typer.Option(1024, help="Image width (with --pipeline)."),
                  plan_out: Path | None = typer.Option(None, help="Also write the plan as a JSON file here."),
                  write_checkpoint: bool = typer.Option(True, help="Store the plan in the checkpoint."),
                  testbed: str = typer.Option("default", help=TESTBED_HELP + " (without --pipeline)")) -> None:
    """Measure which (layer, σ band) cells keep the samples within budget and store that serving plan."""
    from .core.checkpoint import CheckpointError
    from .core.config import ConfigError
    from .core.quality import QualityError
    from .plugins.controller.calibrate import CalibrationError
    from .plugins.controller.report import format_report

    try:
        if pipeline is None:
            from .testbed.calibration import calibrate_testbed
            from .testbed.registry import get_testbed

            get_testbed(testbed).require_weights()
            report = calibrate_testbed(config, checkpoint, out=out, device=device, steps=steps, prompts=prompts,
                                       write_checkpoint=write_checkpoint, plan_out=plan_out, testbed=testbed)
        else:
            from .hosts.diffusers.calibration import calibrate_pipeline

            report = calibrate_pipeline(pipeline, config, checkpoint, out=out, prompts_file=prompts_file,
                                        n_prompts=prompts, steps=steps, device=device, dtype=dtype, height=height,
                                        width=width, write_checkpoint=write_checkpoint, plan_out=plan_out)
    except (CalibrationError, QualityError, CheckpointError, ConfigError, OSError, ValueError) as exc:
        typer.echo(f"calibrate: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_report(report))
    where = f"stored in {checkpoint}" if write_checkpoint else "not stored in the checkpoint"
    typer.echo(f"plan {where}; report: {out}/ (calibration.txt, calibration.json, calibration.png)")


@controller_app.command("train")
def controller_train(config: Path = typer.Option(..., help="Serving config of the checkpoint; its "
                                                 "[plugins.controller.policy_training] section sets the reward."),
                     checkpoint: Path = typer.Option(..., help="The learned backend's checkpoint (layers to route)."),
                     out: Path = typer.Option(Path("attnplug-policy.safetensors"), help="Policy file to write."),
                     minutes: float | None = typer.Option(None, help="Train for this long (wall clock)."),
                     updates: int | None = typer.Option(None, help="Train for this many updates."),
                     resume: Path | None = typer.Option(None, help="A policy file to continue training (its "
                                                                   "optimizer, baseline and λ)."),
                     text: bool | None = typer.Option(None, "--text/--no-text", help="Feed the pooled prompt "
                                                      "embedding to the policy (default: the config's use_text)."),
                     pipeline: str | None = typer.Option(None, help="A diffusers pipeline (local folder or hub id "
                                                                    "in the local cache) instead of the testbed."),
                     prompts_file: Path | None = typer.Option(None, help="JSON list of prompt strings (with "
                                                                         "--pipeline)."),
                     steps: int = typer.Option(20, help="Sampler steps."),
                     device: str = typer.Option("cpu", help="'cpu' or 'cuda'."),
                     dtype: str = typer.Option("bfloat16", help="Pipeline dtype (with --pipeline)."),
                     height: int = typer.Option(1024, help="Image height (with --pipeline)."),
                     width: int = typer.Option(1024, help="Image width (with --pipeline).")) -> None:
    """Train a per-step, per-layer routing policy with REINFORCE against the exact samples."""
    from .core.quality import QualityError
    from .plugins.controller.calibrate import CalibrationError
    from .plugins.controller.train_policy import PolicyTrainingError, describe

    command = "controller train"
    with expected_errors(command):
        if minutes is None and updates is None:
            raise UsageProblem("give --minutes, --updates or both")
        if minutes is not None and not (minutes > 0 and minutes < float("inf")):
            raise UsageProblem(f"--minutes {minutes}: expected a positive number")
        check_range("--updates", updates, 1)
        check_range("--steps", steps, 1)
        check_device(device)
        check_output("--out", out)
        if not checkpoint.is_file():
            raise UsageProblem(f"--checkpoint {checkpoint}: no checkpoint file there")
        if resume is not None and not resume.is_file():
            raise UsageProblem(f"--resume {resume}: no policy file there")
        if pipeline is None and prompts_file is not None:
            raise UsageProblem("--prompts-file needs --pipeline (the testbed draws its own prompts)")
    try:
        if pipeline is None:
            from .testbed.policy_training import train_testbed_policy

            report = train_testbed_policy(config, checkpoint, policy_out=out, device=device, steps=steps,
                                          minutes=minutes, updates=updates, resume=resume, use_text=text)
        else:
            from .hosts.diffusers.controller import train_pipeline_policy

            report = train_pipeline_policy(pipeline, config, checkpoint, policy_out=out, prompts_file=prompts_file,
                                           steps=steps, device=device, dtype=dtype, height=height, width=width,
                                           minutes=minutes, updates=updates, resume=resume, use_text=text)
    except (PolicyTrainingError, CalibrationError, QualityError, OSError, ValueError) as exc:
        raise fail(command, str(exc).replace("\n", " ")) from None
    typer.echo(describe(report))


@app.command("convert-seed-checkpoint")
def convert_seed(src: Path = typer.Argument(..., help="The earlier ComfyUI node pack's flux2_ttr.pt "
                                                       "(format flux2_ttr_v2)."),
                 dst: Path = typer.Argument(..., help="attnplug checkpoint to write (.safetensors).")) -> None:
    """Convert a checkpoint of the earlier ComfyUI node pack (ComfyUI-Approximate-Attention) into an attnplug
    checkpoint (read with weights_only=True)."""
    from .plugins.ttr.seed_convert import convert_seed_checkpoint

    try:
        result = convert_seed_checkpoint(src, dst)
    except (ValueError, OSError) as exc:
        typer.echo(f"convert-seed-checkpoint: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {dst}; a config that accepts it needs:\n\n{result.config_toml}")


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                        "help_option_names": []})
def bench(ctx: typer.Context) -> None:
    """Time exact and approximate attention side by side (`attnplug bench --help` for its options)."""
    from .bench.run import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


@app.command("bench-model", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                              "help_option_names": []})
def bench_model(ctx: typer.Context) -> None:
    """Time one forward of a FLUX.1-dev-shaped transformer per attention mode (`attnplug bench-model --help`)."""
    from .bench.model import main as bench_model_main

    raise typer.Exit(bench_model_main(list(ctx.args)))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="attnplug", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
