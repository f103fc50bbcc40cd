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


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="attnplug", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
