"""The pluggy hook specifications of attnplug (project name `attnplug`, hooks prefixed `attnplug_`).

Registration hooks run once, when a `Session` is built (and by `attnplug plugins list`); lifecycle
hooks run once per sampling run or step. No hook runs on the per-attention-call hot path: the
session resolves everything into plain objects first.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .registrar import Registrar
    from .session import RunInfo, Session

PROJECT = "attnplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---- registration (cold path, once per session build) --------------------------------------------

@hookspec
def attnplug_register_backends(registrar: "Registrar") -> None:
    """Register attention backends.

    Called once per session build and by `attnplug plugins list`, with a registrar bound to the
    calling plugin.

    :param registrar: call `registrar.add(name, factory, settings_model, doc)`;
        `factory(settings, session) -> Backend`, where `settings` is the plugin's validated config
        section (see `attnplug_config_sections`) or None.
    :return: nothing. Every plugin's registrations are collected; a name registered by two plugins
        raises an error naming both.
    """


@hookspec
def attnplug_register_gates(registrar: "Registrar") -> None:
    """Register gate kinds, which users list under `[[gates]]` with `kind = "<name>"`.

    Called once per session build and by `attnplug plugins list`.

    :param registrar: `registrar.add(kind, factory, settings_model, doc)`; the factory gets the
        validated `[[gates]]` entry (an instance of `settings_model`) and the session, and returns a
        `Gate`.
    :return: nothing; registrations from all plugins are collected, duplicates raise.
    """


@hookspec
def attnplug_register_distillers(registrar: "Registrar") -> None:
    """Register distillers, which train learned backends from the exact path's output.

    Called once per session build and by `attnplug plugins list`.

    :param registrar: `registrar.add(name, factory, settings_model, doc)`; the factory gets the
        plugin's validated config section and the session, and returns a `Distiller`. The session
        builds the one named by the config's `distiller` field.
    :return: nothing; registrations are collected, duplicates raise.
    """


@hookspec
def attnplug_register_loggers(registrar: "Registrar") -> None:
    """Register logger kinds, which users list under `[[loggers]]` with `kind = "<name>"`.

    Called once per session build and by `attnplug plugins list`.

    :param registrar: `registrar.add(kind, factory, settings_model, doc)`; the factory gets the
        validated `[[loggers]]` entry and the session, and returns a `Logger` (one that also has
        `log_image` receives the images hosts hand to `session.loggers.log_image`).
    :return: nothing; registrations are collected, duplicates raise.
    """


@hookspec
def attnplug_register_quality_terms(registrar: "Registrar") -> None:
    """Register quality terms, which score a candidate sample against the exact sample of the same prompt
    and noise (`attnplug.core.quality.QualityTerm`); calibration budgets and controller rewards name them.

    Called when a calibration or controller run builds its terms, and by `attnplug plugins list`.

    :param registrar: `registrar.add(name, factory, settings_model, doc)`; the factory gets the term's
        validated options (an instance of `settings_model`, or None) and the session, and returns a
        `QualityTerm` whose `name` is the registered name.
    :return: nothing; registrations from all plugins are collected, duplicates raise naming both plugins.
    """


@hookspec
def attnplug_config_sections() -> "dict[str, type[BaseModel]]":
    """Contribute the pydantic model of this plugin's `[plugins.<name>]` config section(s).

    Called when a config is validated (before any session work) and by `attnplug config schema`.

    :return: a mapping section name → pydantic model (`extra="forbid"`, every field with a
        default). Results of all plugins are merged; a section name claimed by two plugins raises.
        A section present in a config file but claimed by no active plugin is an error.
    """


# ---- lifecycle (once per session, run or step; never per attention call) -------------------------

@hookspec
def attnplug_session_start(session: "Session") -> None:
    """The session has been built: backends, gates, distiller and loggers exist.

    :param session: the new session. Plugins may attach state to it (e.g. load a checkpoint).
    :return: nothing; every implementation runs. An exception aborts the session build with the
        plugin's name (bad state must be reported before sampling starts).
    """


@hookspec
def attnplug_run_start(session: "Session", run: "RunInfo") -> None:
    """A sampling run (one image / one `pipe(...)` call) starts.

    :param session: the session.
    :param run: the run's index, step count when known, and host metadata.
    :return: nothing; every implementation runs; an exception is logged and ignored (sampling goes on).
    """


@hookspec
def attnplug_step_start(session: "Session", step_index: int, sigma: "float | None") -> None:
    """A sampler step starts (the first attention call of a new step, or the host's step hook).

    :param session: the session.
    :param step_index: step within the run, counted from 0.
    :param sigma: the step's noise level, or None when the host does not know it.
    :return: nothing; every implementation runs; exceptions are logged and ignored.
    """


@hookspec
def attnplug_run_end(session: "Session", run: "RunInfo") -> None:
    """A sampling run ended (the host reported it, or the session detected a new run).

    Distillers flush per-run accumulators here (exactly once per run).

    :param session: the session.
    :param run: the run that ended, with its per-layer statistics.
    :return: nothing; every implementation runs; exceptions are logged and ignored.
    """


@hookspec
def attnplug_session_close(session: "Session") -> None:
    """The session is closing: release device memory, close files and experiments.

    :param session: the session.
    :return: nothing; every implementation runs; exceptions are logged and ignored.
    """
