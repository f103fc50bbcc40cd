"""The plugin manager: built-in plugins, entry-point plugins, blocking, and a typed facade.

Hosts and the session never call `pm.hook` directly; they call `Plugins` methods, which say what
they return. A plugin that fails to import or register is reported by name with the reason and
skipped; it never takes the others down.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import pluggy
from pydantic import BaseModel

from . import hookspecs
from .registrar import Registrar

if TYPE_CHECKING:
    from .session import RunInfo, Session

log = logging.getLogger("attnplug")

ENTRY_POINT_GROUP = "attnplug"
DISABLE_ENV = "ATTNPLUG_DISABLE_PLUGINS"
TRACE_ENV = "ATTNPLUG_TRACE_PLUGINS"

#: Built-in plugins, registered by the core itself: name → module (relative to the package).
BUILTIN_PLUGINS: dict[str, str] = {
    "core": "attnplug.core.builtin",
    "landmark": "attnplug.plugins.landmark.plugin",
    "ttr": "attnplug.plugins.ttr.plugin",
    "controller": "attnplug.plugins.controller.plugin",
    "logging_comet": "attnplug.plugins.logging_comet.plugin",
}
ESSENTIAL_PLUGINS = frozenset({"core"})

FAMILIES = ("backend", "gate", "distiller", "logger", "quality_term")
_REGISTER_HOOKS = {
    "backend": "attnplug_register_backends",
    "gate": "attnplug_register_gates",
    "distiller": "attnplug_register_distillers",
    "logger": "attnplug_register_loggers",
    "quality_term": "attnplug_register_quality_terms",
}


@dataclass
class PluginInfo:
    """What `attnplug plugins list` shows for one plugin."""

    name: str
    origin: str  # "built-in", "entry point (<dist>)", "blocked", "failed"
    version: str = ""
    error: str = ""
    registers: dict[str, list[str]] = field(default_factory=dict)


def disabled_from_env() -> set[str]:
    """Plugin names listed in `ATTNPLUG_DISABLE_PLUGINS` (comma or space separated)."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {n for n in raw.replace(",", " ").split() if n}


class Plugins:
    """Typed facade over one pluggy `PluginManager` (one per process, see `get_plugins`)."""

    def __init__(self, disabled: Iterable[str] = (), load_entry_points: bool = True,
                 builtins: dict[str, str] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._callers: dict[tuple[str, str], Any] = {}  # (hook, plugin) → caller; cleared on (un)register
        self.hook_failures: dict[tuple[str, str], int] = {}  # (plugin, hook) → failures (warned the first time)
        self.disabled = set(disabled) | disabled_from_env()
        blocked_essentials = self.disabled & ESSENTIAL_PLUGINS
        if blocked_essentials:
            raise ValueError(f"plugin(s) {sorted(blocked_essentials)} are essential and cannot be disabled")
        if os.environ.get(TRACE_ENV):
            self.pm.trace.root.setwriter(lambda msg: log.debug("pluggy: %s", msg.rstrip()))
            self.pm.enable_tracing()
        for name, module in (BUILTIN_PLUGINS if builtins is None else builtins).items():
            self._load(name, lambda m=module: importlib.import_module(m), "built-in", _own_version())
        if load_entry_points:
            self.load_entry_points()
        self.pm.check_pending()

    # ---- loading -----------------------------------------------------------------------------
    def _load(self, name: str, loader: Callable[[], Any], origin: str, version: str) -> None:
        if name in self.infos and self.infos[name].origin != "blocked":
            log.warning("attnplug: plugin %r from %s ignored: a plugin of that name is already loaded (%s)",
                        name, origin, self.infos[name].origin)
            return
        if name in self.disabled:
            self.infos[name] = PluginInfo(name, "blocked", version, "disabled by config or " + DISABLE_ENV)
            return
        try:
            plugin = loader()
            self.pm.register(plugin, name=name)
            self._callers.clear()
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party import is reported, not raised
            hint = _install_hint(exc)
            self.infos[name] = PluginInfo(name, "failed", version, f"{type(exc).__name__}: {exc}{hint}")
            log.warning("attnplug: plugin %r (%s) disabled: %s: %s%s", name, origin, type(exc).__name__, exc, hint)
            return
        self.infos[name] = PluginInfo(name, origin, version)

    def load_entry_points(self) -> None:
        """Load third-party plugins from the entry-point group `attnplug`, one at a time."""
        for dist in md.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP:
                    continue
                dist_name = dist.metadata["name"] or "?"
                self._load(ep.name, ep.load, f"entry point ({dist_name})", dist.version or "")

    def register(self, plugin: Any, name: str, origin: str = "runtime") -> None:
        """Register a plugin object at run time (tests, ComfyUI nodes). Errors are reported and skipped."""
        self._load(name, lambda: plugin, origin, "")

    def unregister(self, name: str) -> None:
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
            self._callers.clear()
        self.infos.pop(name, None)

    def active(self, blocked: Iterable[str] = ()) -> list[str]:
        """Names of loaded plugins, less those in `blocked`."""
        skip = set(blocked)
        return [n for n, _ in self.pm.list_name_plugin() if n not in skip]

    # ---- registration hooks -------------------------------------------------------------------
    def collect(self, family: str, blocked: Iterable[str] = ()) -> Registrar:
        """Run the registration hook of `family` plugin by plugin; return the filled registrar.

        A plugin whose hook raises is reported and its registrations of this family dropped;
        duplicate names raise (a config cannot be resolved when two plugins claim a name).
        """
        registrar: Registrar = Registrar(family)
        hook_name = _REGISTER_HOOKS[family]
        for name in self.active(blocked):
            caller = self._caller_for(hook_name, name)
            if caller is None:
                continue
            registrar.plugin = name
            before = dict(registrar.entries)
            try:
                caller(registrar=registrar)
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001
                registrar.entries = before
                log.warning("attnplug: plugin %r failed to register its %ss: %s: %s", name, family,
                            type(exc).__name__, exc)
        registrar.plugin = "<unknown>"
        return registrar

    def config_sections(self, blocked: Iterable[str] = ()) -> dict[str, tuple[str, type[BaseModel]]]:
        """Section name → (plugin, model) from every active plugin. A name claimed twice raises."""
        sections: dict[str, tuple[str, type[BaseModel]]] = {}
        for name in self.active(blocked):
            caller = self._caller_for("attnplug_config_sections", name)
            if caller is None:
                continue
            for results in caller():
                for section, model in (results or {}).items():
                    if section in sections:
                        raise ValueError(f"config section [plugins.{section}] claimed by plugin "
                                         f"{sections[section][0]!r} and by plugin {name!r}")
                    sections[section] = (name, model)
        return sections

    def _caller_for(self, hook_name: str, plugin_name: str) -> Any:
        """A caller of `hook_name` that reaches only `plugin_name` (None if it does not implement it).

        Built once per (hook, plugin): lifecycle hooks fire every step, and a subset caller is a view
        whose plugin set is fixed when it is made, so the cache is cleared whenever plugins change.
        """
        key = (hook_name, plugin_name)
        if key not in self._callers:
            plugin = self.pm.get_plugin(plugin_name)
            hook = getattr(self.pm.hook, hook_name)
            caller = None
            if plugin is not None and any(impl.plugin is plugin for impl in hook.get_hookimpls()):
                others = [p for n, p in self.pm.list_name_plugin() if n != plugin_name]
                caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
            self._callers[key] = caller
        return self._callers[key]

    def describe(self) -> list[PluginInfo]:
        """Every known plugin with origin, version and what it registers (for `plugins list`)."""
        for family in FAMILIES:
            try:
                registrar = self.collect(family)
            except ValueError as exc:
                log.warning("attnplug: %s", exc)
                continue
            for reg in registrar.entries.values():
                info = self.infos.get(reg.plugin)
                if info is not None:
                    info.registers.setdefault(family, []).append(reg.name)
        try:
            for section, (plugin, _) in self.config_sections().items():
                info = self.infos.get(plugin)
                if info is not None:
                    info.registers.setdefault("config section", []).append(f"[plugins.{section}]")
        except ValueError as exc:
            log.warning("attnplug: %s", exc)
        return sorted(self.infos.values(), key=lambda i: (i.origin != "built-in", i.name))

    # ---- lifecycle hooks (typed forwarding) ---------------------------------------------------
    def session_start(self, session: "Session") -> None:
        self._call_only(session, "attnplug_session_start", raise_errors=True)

    def run_start(self, session: "Session", run: "RunInfo") -> None:
        self._call_only(session, "attnplug_run_start", run=run)

    def step_start(self, session: "Session", step_index: int, sigma: float | None) -> None:
        self._call_only(session, "attnplug_step_start", step_index=step_index, sigma=sigma)

    def run_end(self, session: "Session", run: "RunInfo") -> None:
        self._call_only(session, "attnplug_run_end", run=run)

    def session_close(self, session: "Session") -> None:
        self._call_only(session, "attnplug_session_close")

    def _call_only(self, session: "Session", hook_name: str, raise_errors: bool = False, **kwargs: Any) -> None:
        """Call a lifecycle hook on the session's active plugins, one plugin at a time.

        Failures are logged with the plugin's name, warned once per (plugin, hook) and counted in
        `hook_failures`; only `session_start` re-raises them.
        """
        for name in session.active_plugins:
            caller = self._caller_for(hook_name, name)
            if caller is None:
                continue
            try:
                caller(session=session, **kwargs)
            except Exception as exc:  # noqa: BLE001
                if raise_errors:
                    raise RuntimeError(f"plugin {name!r} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc
                n = self.hook_failures[(name, hook_name)] = self.hook_failures.get((name, hook_name), 0) + 1
                log.log(logging.WARNING if n == 1 else logging.DEBUG,
                        "attnplug: plugin %r failed in %s: %s: %s (ignored, sampling goes on%s)", name, hook_name,
                        type(exc).__name__, exc, "; later failures of this hook are logged at debug level"
                        if n == 1 else f"; failure {n}")


_PLUGINS: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager (built on first use)."""
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = Plugins()
    return _PLUGINS


def reset_plugins(plugins: Plugins | None = None) -> Plugins | None:
    """Replace the process-wide manager (tests); returns the previous one."""
    global _PLUGINS
    old, _PLUGINS = _PLUGINS, plugins
    return old


def _own_version() -> str:
    try:
        return md.version("attnplug")
    except md.PackageNotFoundError:
        return "0+unknown"


_INSTALL_HINTS = {"comet_ml": "attnplug[comet]", "triton": "attnplug[triton]", "diffusers": "attnplug[diffusers]"}


def _install_hint(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        extra = _INSTALL_HINTS.get(exc.name.split(".")[0])
        if extra:
            return f" (pip install {extra})"
    return ""
