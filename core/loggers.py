"""Metric loggers and the fan-out that keeps a failing logger from breaking sampling.

A logger receives metric dicts with a step and a scope (`"distill"`, `"distill/layer"`,
`"session"`, ...), plus run start/end events. `LoggerFanout` disables a logger that raises, with
one warning, and carries on.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, TextIO, runtime_checkable

from pydantic import Field

from .config import Strict

log = logging.getLogger("attnplug")


@runtime_checkable
class Logger(Protocol):
    name: str

    def log_metrics(self, metrics: Mapping[str, Any], step: int, scope: str) -> None: ...

    def run_event(self, event: str, info: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


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


class ConsoleSettings(Strict):
    """`kind = "console"`: one compact line per metrics event on stderr."""

    every: int = Field(1, ge=1, description="Print one event in `every` (per scope).")
    scopes: list[str] = Field(default_factory=lambda: ["distill", "session"],
                              description="Scopes to print: exact names, or 'prefix/*' (e.g. 'distill/*' adds "
                                          "the per-layer lines).")


class ConsoleLogger:
    name = "console"

    def __init__(self, settings: ConsoleSettings | None = None, stream: TextIO | None = None) -> None:
        self.settings = settings or ConsoleSettings()
        self.stream = stream
        self._seen: dict[str, int] = {}

    def log_metrics(self, metrics: Mapping[str, Any], step: int, scope: str) -> None:
        if not any(scope == s or (s.endswith("/*") and scope.startswith(s[:-1])) for s in self.settings.scopes):
            return
        n = self._seen[scope] = self._seen.get(scope, 0) + 1
        if (n - 1) % self.settings.every:
            return
        parts = []
        for k, v in metrics.items():
            v = _clean(v)
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        print(f"[attnplug {scope} @{step}] " + " ".join(parts), file=self.stream or sys.stderr)

    def run_event(self, event: str, info: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class JsonlSettings(Strict):
    """`kind = "jsonl"`: one JSON object per line: {time, scope, step, metrics} or {time, event, info}."""

    path: str = Field(..., description="File to append to (its folder is created).")


class JsonlLogger:
    name = "jsonl"

    def __init__(self, settings: JsonlSettings) -> None:
        self.path = Path(settings.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO | None = self.path.open("a", encoding="utf-8")

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps(_clean(record)) + "\n")
        self._fh.flush()

    def log_metrics(self, metrics: Mapping[str, Any], step: int, scope: str) -> None:
        self._write({"time": time.time(), "scope": scope, "step": step, "metrics": dict(metrics)})

    def run_event(self, event: str, info: Mapping[str, Any]) -> None:
        self._write({"time": time.time(), "event": event, "info": dict(info)})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class LoggerFanout:
    """Sends every event to every live logger; a logger that raises is disabled with one warning."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = list(loggers)
        self.disabled: dict[str, str] = {}

    def _each(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a logger must never break sampling
                self.loggers.remove(logger)
                name = getattr(logger, "name", type(logger).__name__)
                self.disabled[name] = f"{type(exc).__name__}: {exc}"
                log.warning("attnplug: logger %r disabled after an error in %s: %s: %s (sampling goes on)",
                            name, method, type(exc).__name__, exc)

    def log_metrics(self, metrics: Mapping[str, Any], step: int, scope: str) -> None:
        self._each("log_metrics", metrics, step, scope)

    def run_event(self, event: str, info: Mapping[str, Any]) -> None:
        self._each("run_event", event, info)

    def close(self) -> None:
        self._each("close")
