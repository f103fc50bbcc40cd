"""`CometLogger`: attnplug's metric events, config and images into one Comet experiment (comet_ml).

- The experiment starts at the logger's first event, not when the session is built, so building a
  session never imports comet_ml or touches the network, and a session without runs leaves no empty
  experiment. The flattened config is logged once per experiment as parameters (credentials left out).
- Metric names are `<scope>/<metric>`, and `<scope>/<layer>/<metric>` for events that name a layer
  (`distill/layer`, `session/layer`); non-numeric and non-finite values are left out.
- Steps stay as given, except that a scope whose steps start again in a later session of the same
  process (the `session` scope counts runs per session) continues after the experiment's last step.
- Sessions with the same experiment key share one experiment in a process (`_SHARED`): an online one
  stays open across sessions (comet_ml ends it at exit), so ComfyUI's queued runs do not end and
  resume it each time; an offline one is ended at close, which writes its archive (later sessions
  write further archives of the same key, which `comet upload` appends). comet_ml allows one live
  experiment per process: starting another key first ends the running one (waiting for its data), and
  a logger whose experiment was ended that way starts it again (get-or-create: the same experiment) at
  its next event.
- Any failure (comet_ml missing, no API key, network, rate limiting, a refused key) raises one
  `CometError` with every credential removed from its text; the logger fan-out then disables the
  logger with one warning and sampling goes on. The logger makes no further comet_ml calls.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ...core.loggers import image_grid, scope_matches
from .keys import derived_experiment_key
from .parameters import flat_parameters
from .settings import CometSettings
from .throttle import Throttle

if TYPE_CHECKING:
    from ...core.config import Config

log = logging.getLogger("attnplug")

NO_KEY = ("no Comet API key: set COMET_API_KEY, run `comet login`, or set api_key in the [[loggers]] entry "
          "(or offline = true to write an archive instead)")


class CometError(RuntimeError):
    """A Comet failure; its message carries no credential."""


@dataclass
class _Shared:
    """What the loggers of one experiment key share in a process."""

    experiment: Any = None
    params: dict[str, Any] | None = None  # the parameters logged to `experiment`
    last_step: dict[str, int] = field(default_factory=dict)  # per scope, the last step sent


_SHARED: dict[str, _Shared] = {}

#: comet_ml's automatic logging, all off: console output, the command line, environment, code and git
#: could carry credentials, and attnplug logs what it means to.
_NO_AUTO_LOGGING = dict.fromkeys(
    ("auto_output_logging", "auto_param_logging", "auto_metric_logging", "auto_log_co2", "parse_args", "log_code",
     "log_graph", "log_git_metadata", "log_git_patch", "log_env_details", "log_env_gpu", "log_env_host",
     "log_env_cpu", "log_env_network", "log_env_disk"), False)


def metric_values(metrics: Mapping[str, Any], scope: str) -> dict[str, float]:
    """Comet metric names and numbers of one event (see the module docstring)."""
    layer = metrics.get("layer")
    prefix = f"{scope}/{layer}/" if isinstance(layer, str) else f"{scope}/"
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "layer":
            continue
        number = _number(value)
        if number is not None:
            out[prefix + str(key)] = number
    return out


def _number(value: Any) -> float | None:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value) if isinstance(value, float) else value
    return None


class CometLogger:
    """The `comet` logger kind (module docstring); `clock` feeds the throttle (tests)."""

    name = "comet"

    def __init__(self, settings: CometSettings, config: "Config", clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        root = config.root
        stem = Path(root.checkpoint).stem if root.checkpoint else "attnplug"
        self.experiment_name = settings.experiment_name or stem
        if settings.experiment_key is not None:
            self.key: str | None = settings.experiment_key
        elif root.checkpoint:
            self.key = derived_experiment_key(root.checkpoint, self.experiment_name, settings.project,
                                              settings.workspace, root.training)
        else:
            self.key = None
        self.parameters = flat_parameters(config)
        self.throttle = Throttle(settings.log_every, settings.max_metrics_per_minute, clock or time.monotonic)
        self._secrets = [settings.api_key.get_secret_value()] if settings.api_key is not None else []
        self._shared = _Shared()
        self._offsets: dict[str, int] = {}
        self._experiment: Any = None
        self._off = False  # failed or closed: no more comet_ml calls

    # ---- the Logger protocol -----------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int, scope: str) -> None:
        if self._off or not scope_matches(scope, self.settings.scopes):
            return
        values = metric_values(metrics, scope)
        if values and self.throttle.admit((scope, metrics.get("layer")), step, values):
            self._send(values, step, scope)

    def log_image(self, name: str, image: Any, step: int, scope: str = "samples") -> None:
        """Send an image or a batch (tiled into one grid; layout: `core.loggers.ImageLogger`)."""
        if self._off or not self.settings.images or not scope_matches(scope, self.settings.scopes):
            return
        try:
            grid = image_grid(image)
        except ValueError as exc:  # a host's mistake costs this image, not the experiment
            log.warning("attnplug: comet: image %r (scope %r) not sent: %s", name, scope, exc)
            return
        try:  # comet_ml converts arrays through Pillow too; handing it an image skips its file-path probe
            from PIL import Image

            data, extra = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid), {}
        except ImportError:
            data, extra = grid, {"image_minmax": (0, 255)}
        experiment = self._ensure()
        with self._guard("logging an image"):
            experiment.log_image(data, name=f"{scope}/{name}", step=self._step(scope, step), **extra)

    def run_event(self, event: str, info: Mapping[str, Any]) -> None:
        if self._off:
            return
        self._ensure()
        if event == "run_end":
            self._flush()

    def close(self) -> None:
        """Send what the throttle held back; end the experiment when offline or unkeyed (module docstring)."""
        if self._off or self._experiment is None:
            self._off = True
            return
        self._flush()
        if self.throttle.held:
            log.info("attnplug: comet: %d metric events were held back by log_every / max_metrics_per_minute "
                     "(the latest of each scope and layer was sent)", self.throttle.held)
        experiment, self._experiment = self._experiment, None
        with self._guard("ending the experiment"):
            if self.settings.offline or self.key is None:
                self._shared.experiment, self._shared.params = None, None
                experiment.end()
        self._off = True

    # ---- internals ------------------------------------------------------------------------------------
    def _send(self, values: dict[str, float], step: int, scope: str) -> None:
        experiment = self._ensure()
        with self._guard("logging metrics"):
            experiment.log_metrics(values, step=self._step(scope, step))

    def _flush(self) -> None:
        for (scope, _), step, values in self.throttle.flush():
            self._send(values, step, scope)

    def _step(self, scope: str, step: int) -> int:
        if scope not in self._offsets:
            last = self._shared.last_step.get(scope)
            self._offsets[scope] = 0 if last is None or step > last else last + 1 - step
        step += self._offsets[scope]
        self._shared.last_step[scope] = max(step, self._shared.last_step.get(scope, step))
        return step

    def _ensure(self) -> Any:
        """The live experiment, started (or taken over from an earlier session of this key) on first use."""
        if self._experiment is not None:
            if not getattr(self._experiment, "ended", False):
                return self._experiment
            # comet_ml keeps one running experiment per process: starting another key ended this one
            self._experiment = self._shared.experiment = None
        with self._guard("starting the experiment"):
            try:
                import comet_ml
            except ImportError:
                raise CometError("comet_ml is not installed (pip install 'attnplug[comet]')") from None
            if self.key is not None:
                self._shared = _SHARED.setdefault(self.key, _Shared())
            experiment = self._shared.experiment
            if experiment is None or not getattr(experiment, "alive", False) or getattr(experiment, "ended", False):
                experiment = self._start(comet_ml)
                self._shared.experiment, self._shared.params = experiment, None
            if self._shared.params != self.parameters:
                experiment.log_parameters(self.parameters)
                self._shared.params = dict(self.parameters)
            self._experiment = experiment
        return experiment

    def _start(self, comet_ml: Any) -> Any:
        s = self.settings
        api_key = None if s.offline else self._api_key(comet_ml)
        if not s.offline and not api_key:
            raise CometError(NO_KEY)
        running = comet_ml.get_running_experiment()
        if running is not None and not getattr(running, "ended", False):
            running.end()  # comet_ml allows one per process and would end it without waiting for its data
        config = comet_ml.ExperimentConfig(name=self.experiment_name, tags=list(s.tags) or None,
                                           offline_directory=s.offline_directory, display_summary_level=0,
                                           **_NO_AUTO_LOGGING)
        experiment = comet_ml.start(api_key=api_key, workspace=s.workspace, project_name=s.project,
                                    experiment_key=self.key, mode="get_or_create", online=not s.offline,
                                    experiment_config=config)
        if not getattr(experiment, "alive", False):
            raise CometError("the Comet experiment did not start (comet_ml reports it not alive; its own log "
                             "says why)")
        return experiment

    def _api_key(self, comet_ml: Any) -> str | None:
        """The configured key, else the one comet_ml finds (COMET_API_KEY, its config file)."""
        if self._secrets:
            return self._secrets[0] or None
        from comet_ml.config import get_api_key

        key = get_api_key(None, comet_ml.get_config())
        if key:
            self._secrets.append(key)
        return key or None

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn any failure into one `CometError` without credentials, and switch the logger off."""
        try:
            yield
        except CometError as exc:
            self._disable()
            raise CometError(self._redact(f"Comet: {what} failed: {exc}")) from None
        except Exception as exc:  # noqa: BLE001 - comet_ml raises many kinds; none may reach sampling
            self._disable()
            raise CometError(self._redact(f"Comet: {what} failed: {type(exc).__name__}: {exc}")) from None

    def _disable(self) -> None:
        self._off = True
        self._experiment = None
        if self._shared.experiment is not None:  # a broken experiment is not handed to the next session
            self._shared.experiment, self._shared.params = None, None
