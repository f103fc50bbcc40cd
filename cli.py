"""The `attnplug` command line: plugins, config, and the jobs later modules add (demo, eval, bench)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(help="attnplug: swap and learn the attention of diffusion transformers.", no_args_is_help=True,
                  add_completion=False)
plugins_app = typer.Typer(help="Inspect plugins.", no_args_is_help=True)
config_app = typer.Typer(help="Validate configs and print their schema.", no_args_is_help=True)
app.add_typer(plugins_app, name="plugins")
app.add_typer(config_app, name="config")


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
def config_validate(path: Path = typer.Argument(..., help="Config file (.toml or .json).")) -> None:
    """Validate a config file; exit 0 when valid, 2 with every problem named when not."""
    from .core.config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
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
         resume: Path | None = typer.Option(None, help="Checkpoint to continue distilling from.")) -> None:
    """The main job: distill ttr online on the testbed, then compare exact vs hybrid attention."""
    from .testbed.demo import DemoPlan, describe, run_demo

    plan = DemoPlan.quick() if quick else DemoPlan()
    for name, value in (("runs", runs), ("prompts_per_run", prompts_per_run), ("steps", steps),
                        ("eval_prompts", eval_prompts), ("eval_steps", eval_steps)):
        if value is not None:
            setattr(plan, name, value)
    metrics = run_demo(out, device=device, config=config, plan=plan, seed=seed, resume=resume)
    typer.echo(describe(metrics))
    typer.echo(f"report: {out}/ (metrics.json, ttr.safetensors, samples.png, distill.png, distill.jsonl)")


@app.command("eval")
def evaluate_cmd(config: Path = typer.Option(..., help="Config to evaluate (training is forced off)."),
                 checkpoint: Path | None = typer.Option(None, help="Checkpoint to load."),
                 prompts: int = typer.Option(16, help="Held-out prompts."),
                 steps: int = typer.Option(20, help="Euler steps."),
                 seed: int = typer.Option(0, help="Seed of prompts and noise."),
                 device: str = typer.Option("cpu", help="'cpu' or 'cuda'."),
                 json_out: Path | None = typer.Option(None, "--json", help="Write the metrics here.")) -> None:
    """Evaluate a config/checkpoint on the testbed: adherence, fidelity, layers served, time per step."""
    from .testbed.evaluate import evaluate, strip_images

    result = strip_images(evaluate(config, checkpoint, n_prompts=prompts, steps=steps, seed=seed, device=device))
    text = json.dumps(result, indent=2)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text)
    typer.echo(text)


@app.command("convert-seed-checkpoint")
def convert_seed(src: Path = typer.Argument(..., help="The seed pack's flux2_ttr.pt (format flux2_ttr_v2)."),
                 dst: Path = typer.Argument(..., help="attnplug checkpoint to write (.safetensors).")) -> None:
    """Import a checkpoint of the ComfyUI node pack attnplug re-creates (read with weights_only=True)."""
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
