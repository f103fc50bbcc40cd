"""Config files: TOML and JSON, error messages that name file, section, field, value and expectation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from attnplug.core.config import ConfigError, config_json_schema, load_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_toml_and_json_give_the_same_config(tmp_path, core_plugins):
    toml = _write(tmp_path, "c.toml", 'backend = "sdpa"\nexact = "host"\n[[gates]]\nkind = "layers"\n'
                                      'include = ["single:*"]\n')
    js = _write(tmp_path, "c.json", json.dumps({"backend": "sdpa", "exact": "host",
                                               "gates": [{"kind": "layers", "include": ["single:*"]}]}))
    a, b = load_config(toml, core_plugins), load_config(js, core_plugins)
    assert a.root == b.root and a.gates[0].settings == b.gates[0].settings


@pytest.mark.parametrize("text, expected", [
    ('bakend = "sdpa"\n', "[root] bakend: unknown field"),
    ('strict = "sometimes"\n', "[root] strict: got 'sometimes' — input should be a valid boolean"),
    ('seed = "x"\n', "[root] seed: got 'x' — input should be a valid integer"),
    ('[plugins.nosuch]\nx = 1\n', "[plugins.nosuch]: unknown plugin section 'nosuch'"),
    ('backend = "flashy"\n', "[root] backend: unknown backend 'flashy'; registered backends: ['host', 'sdpa']"),
    ('[[gates]]\nkind = "sigma_window"\nmin = "low"\n',
     "[gates[0] (kind 'sigma_window')] min: got 'low' — input should be a valid number"),
    ('[[loggers]]\nkind = "jsonl"\n', "[loggers[0] (kind 'jsonl')] path: missing — a value is required"),
    ('training = true\n', "[root] training: true needs a distiller"),
])
def test_config_errors_name_file_section_field_and_value(tmp_path, core_plugins, text, expected):
    path = _write(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path, core_plugins)
    message = str(err.value)
    assert message.startswith(f"invalid attnplug config {path}:")
    assert expected in message


def test_unreadable_and_malformed_files(tmp_path, core_plugins):
    with pytest.raises(ConfigError, match=r"(?s)missing.toml.*cannot read the file"):
        load_config(tmp_path / "missing.toml", core_plugins)
    with pytest.raises(ConfigError, match=r"(?s)broken.toml.*not valid TOML"):
        load_config(_write(tmp_path, "broken.toml", "backend = \n"), core_plugins)
    with pytest.raises(ConfigError, match=r"(?s)broken.json.*not valid JSON"):
        load_config(_write(tmp_path, "broken.json", "{"), core_plugins)
    with pytest.raises(ConfigError, match=r"top level must be a table/object"):
        load_config(_write(tmp_path, "list.json", "[1]"), core_plugins)


def test_every_problem_is_reported_at_once(tmp_path, core_plugins):
    path = _write(tmp_path, "bad.toml", 'backend = "x"\nexact = "y"\n[[gates]]\nkind = "nope"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, core_plugins)
    assert len(err.value.problems) == 3


def test_cli_validate_exit_codes(tmp_path):
    good = _write(tmp_path, "good.toml", 'backend = "sdpa"\n')
    bad = _write(tmp_path, "bad.toml", '[[gates]]\nkind = "layers"\ninclude = "single:*"\n')
    ok = subprocess.run([sys.executable, "-m", "attnplug.cli", "config", "validate", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run([sys.executable, "-m", "attnplug.cli", "config", "validate", str(bad)],
                          capture_output=True, text=True)
    assert fail.returncode == 2
    assert str(bad) in fail.stderr and "[gates[0] (kind 'layers')] include" in fail.stderr


def test_schema_covers_plugins_gates_and_loggers(core_plugins):
    schema = config_json_schema(core_plugins)
    props = schema["properties"]
    assert schema["additionalProperties"] is False
    gate_kinds = {item["properties"]["kind"]["const"] for item in props["gates"]["items"]["oneOf"]}
    assert gate_kinds == {"layers", "sigma_window", "step_window", "schedule", "tokens"}
    assert {"console", "jsonl"} <= {i["properties"]["kind"]["const"] for i in props["loggers"]["items"]["oneOf"]}


def test_example_configs_are_valid():
    examples = sorted((ROOT / "examples" / "configs").glob("*.toml")) + sorted((ROOT / "testbed" / "configs").glob("*.toml"))
    assert examples
    for path in examples:
        load_config(path)  # the full set of built-in plugins
