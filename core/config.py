"""Config: one TOML or JSON file, validated by pydantic in two passes.

Pass 1 validates the root (`SessionConfig`); pass 2 validates each `[plugins.<name>]` section,
each `[[gates]]` and each `[[loggers]]` entry with the model its plugin registered. Every error
names the file, the section, the field, the bad value and what was expected.
"""
from __future__ import annotations

import json
import os
import reprlib
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .checkpoint import checkpoint_path_problem, file_kind
from .patterns import describe_layers, layer_matches

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from .plugins import Plugins


#: Seeds are 64-bit signed integers (what torch generators and numpy take without overflowing).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
#: A config file larger than this is refused before it is read (attnplug configs are a few KiB).
MAX_CONFIG_BYTES = 16 * 2**20


class Strict(BaseModel):
    """Base of every attnplug config model: unknown fields are errors, types are strict (`training = "no"`
    and `alpha_max = true` are errors, not coerced; an integer is accepted where a number is expected), and
    numbers are finite (a field that means "unbounded" by infinity says so itself, `allow_inf_nan=True`, and
    rejects NaN with `reject_nan`).

    A model may also define `check_semantics(ctx: CheckContext, section: str)`: checks that need the registry
    or the model's layers (backends named in it, layer patterns), run after every model validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def reject_nan(value: float | None) -> float | None:
    """For float fields that allow infinity: NaN is never a meaningful bound."""
    if value is not None and value != value:
        raise ValueError("NaN is not a number; expected a number or inf")
    return value


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
        "per_step", description="How non-finite output of the approximate backend is kept out of the image. "
                                "'per_step' (default, no device sync per call): the backend replaces every output "
                                "row that is not finite on the device (the ttr kernels by their exact landmark "
                                "branch's row, other backends by zeros) and raises a per-layer device flag; the "
                                "flags are read once per sampler step without waiting for the GPU (at most a step "
                                "or two late; every 64 approximate calls on a host that reports no steps; at run "
                                "end), and a flagged layer is served exact for the rest of the session, counted "
                                "and warned once. 'every_call': one device sync per call (the CPU cannot run ahead "
                                "of the GPU); a call with non-finite output gets exact attention instead, and the "
                                "layer tries again at its next call.")
    training: bool = Field(False, description="Run the distiller while sampling.")
    distiller: str | None = Field(None, description="Registered distiller to train with (e.g. 'ttr').")
    mode: Literal["passthrough", "preview"] = Field(
        "passthrough", description="While training: return the teacher (passthrough) or let ready layers "
                                   "serve the student (preview).")
    checkpoint: str | None = Field(
        None, description="Checkpoint to load at start (and save to, when training). A path that exists but is not a "
                          "regular file (a folder, a FIFO) is an error. A missing file is where a training session "
                          "starts fresh and saves; a session that does not train warns that it serves without it "
                          "(an error with `strict = true`).")
    other_model: Literal["withhold", "serve"] = Field(
        "withhold", description="Layers of the checkpoint distilled on another model than the one the host binds "
                                "(their q/k projection weights' fingerprints differ, e.g. a fine-tune): 'withhold' "
                                "(default) serves them exact, warned once; 'serve' serves them anyway, warned (for "
                                "measuring what that costs).")
    shadow_exact: bool = Field(False, description="Also compute exact attention for every approximated call and "
                                                  "record per-layer fidelity (output cosine, relative L2). Costs an "
                                                  "exact attention per call: for evaluation, not for speed.")
    seed: int = Field(0, ge=SEED_MIN, le=SEED_MAX,
                      description="Seed of every random choice attnplug makes (layer sets, query subsets); a 64-bit "
                                  "signed integer.")
    disable_plugins: list[str] = Field(default_factory=list, description="Plugins to block by name.")
    gates: list[KindEntry] = Field(default_factory=list, description="Gates, in the order they are consulted.")
    loggers: list[KindEntry] = Field(default_factory=lambda: [KindEntry(kind="console")],
                                     description="Metric loggers.")
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per-plugin sections.")

    def check_semantics(self, ctx: "CheckContext", section: str) -> None:
        ctx.backend(section, "backend", self.backend)
        ctx.backend(section, "exact", self.exact, learned=False)
        if self.checkpoint:
            problem = checkpoint_path_problem(self.checkpoint)
            if problem:
                ctx.problems.append(f"[{section}] checkpoint: {problem}")
            elif not self.training and not Path(self.checkpoint).exists():
                (ctx.problems if self.strict else ctx.warnings).append(
                    f"[{section}] checkpoint: {self.checkpoint} does not exist; a session that does not train "
                    "serves without it" + (" (strict = true: an error)" if self.strict else ""))


@dataclass
class CheckContext:
    """What semantic checks consult once every model validated: the registered backends (with the capabilities
    their plugins declare, None where undeclared) and, when a host or model reports them, its layer keys.
    Checks append to `problems` (the config is refused), `warnings` (it is valid but likely not meant) and
    `pattern_warnings` (layer patterns that match none of `layers`)."""

    backends: Mapping[str, Any]
    layers: Sequence[str] | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pattern_warnings: list[str] = field(default_factory=list)  # layer patterns that match no layer

    def backend(self, section: str, fld: str, name: str, *, learned: bool | None = None) -> None:
        """`name` must be a registered backend; `learned` True/False also asks for (not) a learned one."""
        if name not in self.backends:
            self.problems.append(f"[{section}] {fld}: unknown backend {name!r}; registered backends: "
                                 f"{sorted(self.backends)}")
            return
        caps = self.backends[name]
        is_learned = getattr(caps, "learned", None)
        if learned is None or is_learned is None or is_learned == learned:
            return
        if learned:
            self.problems.append(f"[{section}] {fld}: backend {name!r} is not learned; expected a learned backend "
                                 f"({sorted(n for n, c in self.backends.items() if getattr(c, 'learned', False))})")
        else:
            self.problems.append(f"[{section}] {fld}: backend {name!r} is learned; the exact path needs an exact "
                                 "backend")

    def layer_patterns(self, section: str, fld: str, patterns: Sequence[str]) -> None:
        """Warn about patterns that match none of the model's layers (when they are known)."""
        if self.layers is None:
            return
        for p in patterns:
            if not any(layer_matches(p, key) for key in self.layers):
                self.pattern_warnings.append(f"[{section}] {fld}: pattern {p!r} matches none of the model's layers "
                                     f"({describe_layers(self.layers)})")


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
    warnings: list[str] = field(default_factory=list)  # valid, but likely not meant (see CheckContext)

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
    """Parse a TOML (`.toml`) or JSON (`.json`) file into a dict; errors name the file.

    Only regular files are read (a FIFO would block, a device never end), at most `MAX_CONFIG_BYTES`; the
    text must be UTF-8."""
    p = Path(path)
    kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
    try:
        mode = os.stat(p).st_mode  # a folder cannot be opened as a file; a FIFO must not be
        if not stat.S_ISREG(mode):
            raise ConfigError(str(p), [f"{file_kind(mode)}, expected a {kind} file"])
        with open(p, "rb", opener=_open_nonblocking) as fh:  # the file may be swapped in between: check again
            mode = os.fstat(fh.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(str(p), [f"{file_kind(mode)}, expected a {kind} file"])
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read the file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(str(p), [f"larger than {MAX_CONFIG_BYTES // 2**20} MiB; not an attnplug config"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = " (it looks like UTF-16: save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ConfigError(str(p), [f"not UTF-8 text: byte {raw[exc.start]:#04x} at offset {exc.start} "
                                   f"cannot be decoded{hint}; expected a {kind} file"]) from None
    try:
        if kind == "JSON":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(p), [f"not valid {kind}: {exc}"]) from None
    except RecursionError:
        raise ConfigError(str(p), [f"nested too deeply to be an attnplug config ({kind})"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(p), [f"top level must be a table/object, got {type(data).__name__}"])
    return data


def _open_nonblocking(path: str, flags: int) -> int:
    """`open` that does not wait for a writer when `path` is a FIFO (it is refused after `fstat`)."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def load_config(source: "str | Path | Mapping[str, Any] | Config | SessionConfig",
                plugins: "Plugins | None" = None, layers: Sequence[str] | None = None) -> Config:
    """Validate a config from a file path, a dict, a `SessionConfig` or an existing `Config`.

    `layers`: the model's layer keys when known (layer patterns that match none of them are warned about)."""
    if isinstance(source, Config):
        return source
    if isinstance(source, SessionConfig):
        data: dict[str, Any] = source.model_dump(exclude_unset=True)
        name = "<SessionConfig>"
    elif isinstance(source, Mapping):
        data, name = dict(source), "<dict>"
    else:
        data, name = read_config_file(source), str(source)
    return validate_config(data, name, plugins, layers)


def _validate_root(data: Mapping[str, Any], problems: list[str]) -> SessionConfig:
    """The root model; on errors they go to `problems` and the bad keys are dropped (their defaults stand in),
    so the plugin sections, gates and loggers are still checked in the same pass."""
    data = dict(data)
    for _ in range(3):
        try:
            return SessionConfig.model_validate(data)
        except ValidationError as exc:
            problems += [_format(err, "root") for err in exc.errors()]
            for err in exc.errors():
                loc = err.get("loc", ())
                if not loc:
                    return SessionConfig()
                top = loc[0]
                if top == "plugins" and len(loc) > 1 and isinstance(data.get("plugins"), dict):
                    data["plugins"] = {k: v for k, v in data["plugins"].items() if k != loc[1]}
                else:
                    data.pop(str(top), None)
    return SessionConfig()


def validate_config(data: Mapping[str, Any], source: str = "<dict>", plugins: "Plugins | None" = None,
                    layers: Sequence[str] | None = None) -> Config:
    """Both passes over a parsed config, then the semantic checks (`CheckContext`). Raises `ConfigError`
    listing every problem found; warnings are in `Config.warnings`."""
    from .plugins import get_plugins

    problems: list[str] = []
    root = _validate_root(data, problems)
    pm = plugins or get_plugins()
    blocked = set(root.disable_plugins)
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
    config = Config(root=root, sections=sections, gates=gates, loggers=loggers, source=source)
    ctx = check_semantics(config, {n: getattr(r.factory, "capabilities", None) for n, r in backends.entries.items()},
                          layers)
    problems += ctx.problems
    config.warnings = ctx.warnings + ctx.pattern_warnings
    if root.distiller is not None:
        distillers = pm.collect("distiller", blocked)
        if root.distiller not in distillers.entries:
            problems.append(f"[root] distiller: unknown distiller {root.distiller!r}; registered: {distillers.names()}")
    if root.training and root.distiller is None:
        problems.append("[root] training: true needs a distiller (e.g. distiller = \"ttr\")")
    if problems:
        raise ConfigError(source, problems)
    return config


def check_semantics(config: "Config", backends: Mapping[str, Any], layers: Sequence[str] | None = None) -> CheckContext:
    """Run every model's `check_semantics` (root, plugin sections, gates, loggers) against the registered
    `backends` (name → declared capabilities or None) and the model's `layers` when known."""
    ctx = CheckContext(backends, None if layers is None else list(layers))
    models: list[tuple[str, Any]] = [("root", config.root)]
    models += [(f"plugins.{name}", model) for name, model in config.sections.items()]
    models += [(f"gates[{e.index}] (kind {e.kind!r})", e.settings) for e in config.gates]
    models += [(f"loggers[{e.index}] (kind {e.kind!r})", e.settings) for e in config.loggers]
    for section, model in models:
        check = getattr(model, "check_semantics", None)
        if callable(check):
            check(ctx, section)
    return ctx


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


#: Endings of field names that hold credentials: their values are never echoed in an error or logged.
SECRET_FIELD_ENDINGS = ("api_key", "apikey", "token", "password", "secret")


def is_secret_field(name: str) -> bool:
    """Whether a config field of this name holds a credential (e.g. `api_key`)."""
    return name.lower().endswith(SECRET_FIELD_ENDINGS)


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
    shown = "a value (not shown: a credential)" if any(map(is_secret_field, loc)) else \
        _short_repr(value) if not isinstance(value, dict) else "a table"
    return f"[{section}] {fld}: got {shown} — {msg[0].lower() + msg[1:] if msg else 'invalid'}"


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist = 80, 80, 3, 6


def _short_repr(value: Any) -> str:
    """A bounded repr for messages (a value may be huge or deeply nested)."""
    try:
        return _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a message must not fail on an odd value
        return f"<{type(value).__name__}>"


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
