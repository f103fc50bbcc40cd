"""Metric loggers and the fan-out that keeps a failing logger from breaking sampling.

A logger receives metric dicts with a step and a scope (`"distill"`, `"distill/layer"`,
`"session"`, `"session/layer"`, ...), plus run start/end events; loggers that take images also
have `log_image` (`ImageLogger`). `LoggerFanout` disables a logger that raises, with one warning,
and carries on.

The console logger writes through `tqdm.write`, so a progress bar on the same stream stays intact,
and by default prints a few key figures per event; `verbose = true` prints every metric (the
cross-layer quantiles of the distiller's snapshots), which the JSONL logger always keeps.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, TextIO, runtime_checkable

import numpy as np
from pydantic import Field

from .config import Strict

log = logging.getLogger("attnplug")


@runtime_checkable
class Logger(Protocol):
    """What every logger has. Loggers that take images also implement `ImageLogger.log_image`."""

    name: str

    def log_metrics(self, metrics: Mapping[str, Any], step: int, scope: str) -> None: ...

    def run_event(self, event: str, info: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class ImageLogger(Protocol):
    """The optional image method of a logger (`LoggerFanout.log_image` skips loggers without it).

    `image`: a torch tensor or numpy array `[H, W, C]` or `[B, H, W, C]` (ComfyUI's IMAGE layout),
    float in [0, 1] or uint8, C = 1, 3 or 4; `image_grid` turns it into one uint8 `[H, W, C]` array.
    """

    def log_image(self, name: str, image: Any, step: int, scope: str) -> None: ...


def image_grid(image: Any, columns: int = 8) -> np.ndarray:
    """One uint8 `[H, W, C]` array from an image or a batch (tiled `columns` per row, row-major).

    Floats are clipped to [0, 1] and scaled to 0..255. Raises ValueError naming the shape or dtype
    when the input is not an image in the layout `ImageLogger` documents.
    """
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy() if image.is_floating_point() else image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
        raise ValueError(f"image: expected [H, W, C] or [B, H, W, C] with C in 1/3/4, got shape {tuple(arr.shape)}")
    if np.issubdtype(arr.dtype, np.floating):
        arr = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"image: expected float in [0, 1] or uint8 values, got dtype {arr.dtype}")
    b, h, w, c = arr.shape
    cols = max(1, min(columns, b))
    rows = -(-b // cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = arr[i]
    return grid


def scope_matches(scope: str, patterns: Iterable[str]) -> bool:
    """Whether `scope` is selected by `patterns`: exact names, `'prefix/*'` (the prefix's sub-scopes), or `'*'`."""
    for p in patterns:
        if p == "*" or scope == p or (p.endswith("/*") and scope.startswith(p[:-1])):
            return True
    return False


def _clean(value: Any) -> Any:
    """JSON-safe scalar: tensors become numbers, non-finite floats become None."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return str(value)


#: The few figures a default console line shows per scope, in this order (metrics an event lacks are
#: left out). Other scopes show their first `ConsoleSettings.max_fields` plain figures.
SHORT_FIELDS: dict[str, tuple[str, ...]] = {
    "distill": ("reason", "updates", "ready_layers", "layers_tracked", "loss/p50", "ema_cos/p50", "ema_cos/max",
                "replay_mb"),
    "distill/layer": ("layer", "updates", "loss", "cos_dist", "ema_cos", "ready"),
    "distill/readiness": ("layer", "updates", "ema_cos", "ready"),
    "session": ("calls", "approximate_share", "fallbacks"),
    "session/layer": ("layer", "calls", "fallbacks"),
}


def _format_value(value: Any) -> str:
    value = _clean(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ConsoleSettings(Strict):
    """`kind = "console"`: one line per metrics event on stderr, written through `tqdm.write`."""

    every: int = Field(1, ge=1, description="Print one event in `every` (per scope).")
    scopes: list[str] = Field(default_factory=lambda: ["distill", "session"],
                              description="Scopes to print: exact names, 'prefix/*' (e.g. 'distill/*' adds "
                                          "the per-layer lines) or '*'.")
    verbose: bool = Field(False, description="Print every metric of an event (all cross-layer quantiles, "
                                             "hundreds of characters); default: a few key figures per scope.")
    fields: dict[str, list[str]] = Field(default_factory=dict,
                                         description="Per scope, the metrics a default line shows (replaces "
                                                     "the built-in choice for that scope).")
    max_fields: int = Field(6, ge=1, description="Figures a default line shows for a scope without a "
                                                 "built-in or configured choice (plain names, no quantiles).")


class ConsoleLogger:
    name = "console"

    def __init__(self, settings: ConsoleSettings | None = None, stream: TextIO | None = None) -> None:
        self.settings = settings or ConsoleSettings()
        self.stream = stream
        self._seen: dict[str, int] = {}

    def format(self, metrics: Mapping[str, Any], step: int, scope: str) -> str:
        """The line for one event: `[attnplug <scope> @<step>] k=v ...` (short unless `verbose`)."""
        s = self.settings
        if s.verbose:
            items = list(metrics.items())
        else:
            chosen = s.fields.get(scope) or SHORT_FIELDS.get(scope)
            if chosen is not None:
                items = [(k, metrics[k]) for k in chosen if k in metrics]
            else:
                items = [(k, v) for k, v in metrics.items()
                         if "/" not in k and isinstance(_clean(v), (int, float, str))][:s.max_fields]
        return f"[attnplug {scope} @{step}] " + " ".join(f"{k}={_format_value(v)}" for k, v in items)

    def log_metrics(self, metrics: Mapping[str, Any], step: int, scope: str) -> None:
        if not scope_matches(scope, self.settings.scopes):
            return
        n = self._seen[scope] = self._seen.get(scope, 0) + 1
        if (n - 1) % self.settings.every:
            return
        from tqdm import tqdm  # a bar on the same stream is cleared, the line written, the bar redrawn

        tqdm.write(self.format(metrics, step, scope), file=self.stream or sys.stderr)

    def run_event(self, event: str, info: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class JsonlSettings(Strict):
    """`kind = "jsonl"`: one JSON object per line: {time, scope, step, metrics} or {time, event, info}."""

    path: str = Field(..., description="File to append to (its folder is created).")
    scopes: list[str] = Field(default_factory=lambda: ["*"],
                              description="Scopes to write: exact names, 'prefix/*' or '*' (every metric of "
                                          "every event; non-finite values are written as null).")


class JsonlLogger:
    name = "jsonl"

    def __init__(self, settings: JsonlSettings) -> None:
        self.settings = settings
        self.path = Path(settings.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO | None = self.path.open("a", encoding="utf-8")

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps(_clean(record)) + "\n")
        self._fh.flush()

    def log_metrics(self, metrics: Mapping[str, Any], step: int, scope: str) -> None:
        if scope_matches(scope, self.settings.scopes):
            self._write({"time": time.time(), "scope": scope, "step": step, "metrics": dict(metrics)})

    def run_event(self, event: str, info: Mapping[str, Any]) -> None:
        self._write({"time": time.time(), "event": event, "info": dict(info)})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _safe_text(fn: Any, fallback: str) -> str:
    """`fn()` for a message, or `fallback` when it raises (a logger's name or error text may itself fail)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return fallback


def _describe(exc: BaseException) -> str:
    return _safe_text(lambda: f"{type(exc).__name__}: {exc}", type(exc).__name__)


class LoggerFanout:
    """Sends every event to every live logger; a logger that raises (SystemExit included) is disabled with one
    warning. KeyboardInterrupt still stops the run."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = list(loggers)
        self.disabled: dict[str, str] = {}

    def _each(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - a logger must never break sampling
                self.loggers[:] = [x for x in self.loggers if x is not logger]
                name, error = _safe_text(lambda: str(logger.name), type(logger).__name__), _describe(exc)
                self.disabled[name] = error
                log.warning("attnplug: logger %r disabled after an error in %s: %s (sampling goes on)",
                            name, method, error)

    def log_metrics(self, metrics: Mapping[str, Any], step: int, scope: str) -> None:
        self._each("log_metrics", metrics, step, scope)

    def run_event(self, event: str, info: Mapping[str, Any]) -> None:
        self._each("run_event", event, info)

    def close(self) -> None:
        self._each("close")

    def log_image(self, name: str, image: Any, step: int, scope: str = "samples") -> None:
        """Hand an image (`ImageLogger` layout) to the live loggers that take images; the others are skipped.

        A logger that raises here is disabled like in every other method (`_each` runs on the takers).
        """
        everyone = self.loggers
        takers = [lg for lg in everyone if callable(getattr(lg, "log_image", None))]
        if not takers:
            return
        self.loggers = list(takers)
        try:
            self._each("log_image", name, image, step, scope)
        finally:
            survivors = self.loggers
            self.loggers = [lg for lg in everyone if lg not in takers or lg in survivors]
