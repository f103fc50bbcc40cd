"""Config: one TOML or JSON file, validated by pydantic in two passes.

Pass 1 validates the root (`SessionConfig`); pass 2 validates each `[plugins.<name>]` section,
each `[[gates]]` and each `[[loggers]]` entry with the model its plugin registered. Every error
names the file, the section, the field, the bad value and what was expected.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from .plugins import Plugins


class Strict(BaseModel):
    """Base of every attnplug config model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KindEntry(Strict):
    """One `[[gates]]` / `[[loggers]]` entry before pass 2: its kind plus the kind's own fields."""

    model_config = ConfigDict(extra="allow")
    kind: str


class SessionConfig(Strict):
    """The root of an attnplug config file."""

    backend: str = Field("sdpa", description="Backend that serves attention when every gate allows it "
                                             "(an approximate one such as 'ttr', or an exact one).")
    exact: str = Field("host", description="Exact backend for vetoed calls, fallbacks and the distiller's "
                                           "teacher: 'host' (the host's own attention) or 'sdpa'.")
    strict: bool = Field(False, description="Raise instead of falling back to exact attention when the "
                                            "approximate backend cannot serve a call or returns non-finite values.")
    finite_check: Literal["every_call", "per_step"] = Field(
        "every_call", description="How a non-finite output of the approximate backend is caught. 'every_call': "
                                  "that call gets exact attention instead (one device sync per call: the CPU "
                                  "cannot run ahead of the GPU). 'per_step': checked once per sampler step, "
                                  "without a sync per call; a layer that produced non-finite values is served "
                                  "exact for the rest of the run, but the step it happened in keeps them.")
    training: bool = Field(False, description="Run the distiller while sampling.")
    distiller: str | None = Field(None, description="Registered distiller to train with (e.g. 'ttr').")
    mode: Literal["passthrough", "preview"] = Field(
        "passthrough", description="While training: return the teacher (passthrough) or let ready layers "
                                   "serve the student (preview).")
    checkpoint: str | None = Field(None, description="Checkpoint to load at start (and save to, when training).")
    shadow_exact: bool = Field(False, description="Also compute exact attention for every approximated call and "
                                                  "record per-layer fidelity (output cosine, relative L2). Costs an "
                                                  "exact attention per call: for evaluation, not for speed.")
    seed: int = Field(0, description="Seed of every random choice attnplug makes (layer sets, query subsets).")
    disable_plugins: list[str] = Field(default_factory=list, description="Plugins to block by name.")
    gates: list[KindEntry] = Field(default_factory=list, description="Gates, in the order they are consulted.")
    loggers: list[KindEntry] = Field(default_factory=lambda: [KindEntry(kind="console")],
                                     description="Metric loggers.")
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per-plugin sections.")


@dataclass
class ResolvedEntry:
    """A validated gate or logger entry: its kind and its settings model instance."""

    kind: str
    settings: BaseModel | None
    index: int


@dataclass
class Config:
    """A fully validated config: the root plus every plugin section, gate and logger settings."""

    root: SessionConfig
    sections: dict[str, BaseModel] = field(default_factory=dict)
    gates: list[ResolvedEntry] = field(default_factory=list)
    loggers: list[ResolvedEntry] = field(default_factory=list)
    source: str = "<dict>"

    def section(self, name: str) -> BaseModel:
        """The validated `[plugins.<name>]` section (defaults when the file omits it)."""
        try:
            return self.sections[name]
        except KeyError:
            raise KeyError(f"no config section [plugins.{name}] (is the plugin {name!r} active?)") from None


class ConfigError(ValueError):
    """A config that cannot be used. The message names file, section, field, value and expectation."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid attnplug config {source}:\n" + "\n".join(f"  - {p}" for p in problems))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML (`.toml`) or JSON (`.json`) file into a dict; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
        raise ConfigError(str(p), [f"not valid {kind}: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(p), [f"top level must be a table/object, got {type(data).__name__}"])
    return data


def load_config(source: "str | Path | Mapping[str, Any] | Config | SessionConfig",
                plugins: "Plugins | None" = None) -> Config:
    """Validate a config from a file path, a dict, a `SessionConfig` or an existing `Config`."""
    if isinstance(source, Config):
        return source
    if isinstance(source, SessionConfig):
        data: dict[str, Any] = source.model_dump(exclude_unset=True)
        name = "<SessionConfig>"
    elif isinstance(source, Mapping):
        data, name = dict(source), "<dict>"
    else:
        data, name = read_config_file(source), str(source)
    return validate_config(data, name, plugins)


def validate_config(data: Mapping[str, Any], source: str = "<dict>", plugins: "Plugins | None" = None) -> Config:
    """Both passes over a parsed config. Raises `ConfigError` listing every problem found."""
    from .plugins import get_plugins

    try:
        root = SessionConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(source, [_format(err, "root") for err in exc.errors()]) from None

    pm = plugins or get_plugins()
    blocked = set(root.disable_plugins)
    problems: list[str] = []
    unknown_blocked = blocked - set(pm.infos)
    for name in sorted(unknown_blocked):
        problems.append(f"[root] disable_plugins: unknown plugin {name!r} (known: {sorted(pm.infos)})")

    sections: dict[str, BaseModel] = {}
    models = pm.config_sections(blocked)
    for name, raw in root.plugins.items():
        if name not in models:
            problems.append(f"[plugins.{name}]: unknown plugin section {name!r}; active plugins with "
                            f"sections: {sorted(models)}" + (" (this plugin is disabled)" if name in blocked else ""))
    for name, (_, model) in models.items():
        try:
            sections[name] = model.model_validate(root.plugins.get(name, {}))
        except ValidationError as exc:
            problems += [_format(err, f"plugins.{name}") for err in exc.errors()]

    gates = _resolve_entries("gate", "gates", root.gates, pm, blocked, problems)
    loggers = _resolve_entries("logger", "loggers", root.loggers, pm, blocked, problems)

    backends = pm.collect("backend", blocked)
    for fld in ("backend", "exact"):
        value = getattr(root, fld)
        if value not in backends.entries:
            problems.append(f"[root] {fld}: unknown backend {value!r}; registered backends: {backends.names()}")
    if root.exact in backends.entries:
        reg = backends.get(root.exact)
        if getattr(getattr(reg.factory, "capabilities", None), "learned", False):
            problems.append(f"[root] exact: backend {root.exact!r} is learned; the exact path needs an exact backend")
    if root.distiller is not None:
        distillers = pm.collect("distiller", blocked)
        if root.distiller not in distillers.entries:
            problems.append(f"[root] distiller: unknown distiller {root.distiller!r}; registered: {distillers.names()}")
    if root.training and root.distiller is None:
        problems.append("[root] training: true needs a distiller (e.g. distiller = \"ttr\")")
    if problems:
        raise ConfigError(source, problems)
    return Config(root=root, sections=sections, gates=gates, loggers=loggers, source=source)


def _resolve_entries(family: str, section: str, entries: list[KindEntry], pm: "Plugins", blocked: set[str],
                     problems: list[str]) -> list[ResolvedEntry]:
    registrar = pm.collect(family, blocked)
    resolved: list[ResolvedEntry] = []
    for i, entry in enumerate(entries):
        where = f"{section}[{i}]"
        if entry.kind not in registrar.entries:
            problems.append(f"[{where}] kind: unknown {family} kind {entry.kind!r}; registered: {registrar.names()}")
            continue
        reg = registrar.get(entry.kind)
        fields = dict(entry.model_extra or {})
        settings = None
        if reg.settings is not None:
            try:
                settings = reg.settings.model_validate(fields)
            except ValidationError as exc:
                problems += [_format(err, f"{where} (kind {entry.kind!r})") for err in exc.errors()]
                continue
        elif fields:
            problems.append(f"[{where}] {family} kind {entry.kind!r} takes no settings, got {sorted(fields)}")
            continue
        resolved.append(ResolvedEntry(entry.kind, settings, i))
    return resolved


def _format(err: Mapping[str, Any], section: str) -> str:
    """One pydantic error as `[section] field: got <value> — <what was expected>`."""
    loc = [str(x) for x in err.get("loc", ())]
    if section == "root" and loc and loc[0] in ("plugins", "gates", "loggers") and len(loc) > 1:
        section, loc = ".".join(loc[:2]) if loc[0] == "plugins" else f"{loc[0]}[{loc[1]}]", loc[2:]
    fld = ".".join(loc) or "(section)"
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        return f"[{section}] {fld}: unknown field (not expected here; check the spelling)"
    if err.get("type") == "missing":
        return f"[{section}] {fld}: missing — a value is required"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a table"
    return f"[{section}] {fld}: got {shown} — {msg[0].lower() + msg[1:] if msg else 'invalid'}"


def config_json_schema(plugins: "Plugins | None" = None) -> dict[str, Any]:
    """JSON schema of the whole config: the root plus every plugin section, gate and logger kind."""
    from .plugins import get_plugins

    pm = plugins or get_plugins()
    schema = SessionConfig.model_json_schema()
    props = schema.setdefault("properties", {})
    props["plugins"] = {"type": "object", "additionalProperties": False, "description": "Per-plugin sections.",
                        "properties": {n: m.model_json_schema() for n, (_, m) in pm.config_sections().items()}}
    for family, key in (("gate", "gates"), ("logger", "loggers")):
        kinds = []
        for reg in pm.collect(family).entries.values():
            sub = reg.settings.model_json_schema() if reg.settings else {"type": "object", "properties": {}}
            sub.setdefault("properties", {})["kind"] = {"const": reg.name}
            sub["required"] = sorted(set(sub.get("required", [])) | {"kind"})
            sub["description"] = reg.doc
            kinds.append(sub)
        props[key] = {"type": "array", "items": {"oneOf": kinds}, "description": props.get(key, {}).get("description", "")}
    return schema
