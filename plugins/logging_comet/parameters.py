"""The validated config as flat Comet parameters, credentials left out."""
from __future__ import annotations

import json
from typing import Any, Mapping

from pydantic import BaseModel, SecretStr

from ...core.config import Config, is_secret_field


def flat_parameters(config: Config) -> dict[str, Any]:
    """Root fields by name, then `plugins.<section>.<field>`, `gates.<i>.<field>`, `loggers.<i>.<field>`
    (with `kind`), from the validated models — never from the raw file, whose logger entries may hold a key.
    SecretStr values and fields named like credentials (`api_key`, ...) are left out; lists become JSON."""
    out: dict[str, Any] = {}
    _flatten(out, "", config.root.model_dump(exclude={"gates", "loggers", "plugins"}))
    for name, section in sorted(config.sections.items()):
        _flatten(out, f"plugins.{name}.", _dump(section))
    for family, entries in (("gates", config.gates), ("loggers", config.loggers)):
        for i, entry in enumerate(entries):
            _flatten(out, f"{family}.{i}.", {"kind": entry.kind, **_dump(entry.settings)})
    return out


def _dump(model: BaseModel | None) -> dict[str, Any]:
    return {} if model is None else model.model_dump()


def _flatten(out: dict[str, Any], prefix: str, data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, SecretStr) or is_secret_field(str(key)):
            continue
        if isinstance(value, Mapping):
            _flatten(out, f"{prefix}{key}.", value)
        elif isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = json.dumps(value, default=str)
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
