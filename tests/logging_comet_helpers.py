"""Shared by tests/test_logging_comet_*.py: read comet_ml's offline archives back, and a clean Comet setup.

tests/ is not a package: a test file loads this module with `importlib` and binds the fixture it uses
to a module-level name (pytest finds fixtures by the names in the test module).
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from attnplug.core import Plugins


class Archive:
    """One offline archive: experiment.json, the parsed messages and the raw bytes of every member."""

    def __init__(self, path: Path, experiment: dict[str, Any], messages: list[dict[str, Any]],
                 raw: dict[str, bytes]) -> None:
        self.path, self.experiment, self.messages, self.raw = path, experiment, messages, raw

    def metrics(self) -> dict[tuple[str, int], float]:
        """(metric name, step) → value."""
        out = {}
        for m in self.messages:
            if m["type"] == "metric_msg":
                metric = m["payload"]["metric"]
                out[(metric["metricName"], metric["step"])] = metric["metricValue"]
        return out

    def steps(self, name: str) -> list[int]:
        return sorted(step for n, step in self.metrics() if n == name)

    def parameters(self) -> dict[str, Any]:
        """Parameters logged by hand (comet_ml adds its own 'curr_step' ones)."""
        return {m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"] for m in self.messages
                if m["type"] == "parameter_msg" and m["payload"]["param"]["source"] == "manual"}

    def others(self) -> dict[str, Any]:
        return {m["payload"]["key"]: m["payload"]["value"] for m in self.messages if m["type"] == "log_other"}

    def images(self) -> list[tuple[str, int]]:
        """(name, step) of every image."""
        return [(p["additional_params"]["figName"], p["additional_params"]["step"])
                for p in (m["payload"] for m in self.messages if m["type"] == "file_upload")
                if p.get("upload_type") == "visualization"]


def read_archives(folder: Path) -> list[Archive]:
    """Every offline archive in `folder`, oldest first."""
    archives = []
    for path in sorted(folder.glob("*.zip"), key=lambda p: p.stat().st_mtime_ns):
        with zipfile.ZipFile(path) as z:
            raw = {n: z.read(n) for n in z.namelist()}
        messages = [json.loads(line) for line in raw["messages.json"].decode().splitlines() if line.strip()]
        archives.append(Archive(path, json.loads(raw["experiment.json"]), messages, raw))
    return archives


def comet_plugins() -> Plugins:
    """A plugin manager with the core and the logging_comet plugin only."""
    return Plugins(builtins={"core": "attnplug.core.builtin", "logging_comet": "attnplug.plugins.logging_comet.plugin"},
                   load_entry_points=False)


@pytest.fixture
def clean_comet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No Comet key or config from the machine, a fresh working folder, no experiment shared from a
    previous test; yields the folder."""
    from attnplug.plugins.logging_comet import logger as comet_logger

    for var in ("COMET_API_KEY", "COMET_WORKSPACE", "COMET_PROJECT_NAME", "COMET_EXPERIMENT_KEY",
                "COMET_OFFLINE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty.comet.config"
    empty.write_text("[comet]\n")
    monkeypatch.setenv("COMET_CONFIG", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    comet_logger._SHARED.clear()
    yield tmp_path
    comet_logger._SHARED.clear()
