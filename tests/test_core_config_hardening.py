"""Configs that a user gets wrong are refused at validation, all problems in one pass, with the field named;
odd files (binary, UTF-16, deeply nested, FIFOs, folders) give clear errors; and a hypothesis fuzz keeps it so:
every mutated config is either refused with a ConfigError or builds a session that serves a call."""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from attnplug.core import ApproximationError, AttentionCall, CheckpointError, Plugins, Session
from attnplug.core.config import SEED_MAX, ConfigError, SessionConfig, load_config, validate_config
from attnplug.testbed.model import TestbedConfig

TESTBED_LAYERS = TestbedConfig().layer_keys()


@pytest.fixture(scope="module")
def builtin_plugins() -> Plugins:
    """The built-in plugins (core, landmark, ttr), no entry points."""
    return Plugins(load_entry_points=False)


def _problems(data, plugins) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate_config(data, "c.toml", plugins)
    return err.value.problems


@pytest.mark.parametrize("data, expected", [
    ({"training": "no"}, "[root] training: got 'no' — input should be a valid boolean"),
    ({"strict": 1}, "[root] strict: got 1 — input should be a valid boolean"),
    ({"plugins": {"ttr": {"alpha_max": True}}}, "[plugins.ttr] alpha_max: got True — input should be a valid number"),
    ({"plugins": {"ttr": {"feature_dim": 128.0}}}, "[plugins.ttr] feature_dim: got 128.0 — input should be a valid "
                                                   "integer"),
    ({"seed": 2**63}, "[root] seed: got 9223372036854775808 — input should be less than or equal to"),
    ({"plugins": {"distill": {"seed": -(2**63) - 1}}}, "[plugins.distill] seed: got -9223372036854775809"),
    ({"plugins": {"distill": {"replay_max_mb": math.inf}}}, "[plugins.distill] replay_max_mb: got inf — input "
                                                            "should be a finite number"),
    ({"plugins": {"distill": {"readiness_threshold": math.inf}}}, "[plugins.distill] readiness_threshold: got inf"),
    ({"gates": [{"kind": "sigma_window", "min": math.nan}]}, "[gates[0] (kind 'sigma_window')] min: got nan"),
    ({"gates": [{"kind": "sigma_window", "max": math.nan}]}, "[gates[0] (kind 'sigma_window')] max: got nan"),
    ({"gates": [{"kind": "schedule", "rules": [{"backend": "sdpa", "sigma_max": math.nan}]}]},
     "[gates[0] (kind 'schedule')] rules.0.sigma_max: got nan"),
    ({"plugins": {"distill": {"student": "sdpa"}}}, "[plugins.distill] student: backend 'sdpa' is not learned; "
                                                    "expected a learned backend (['ttr'])"),
    ({"plugins": {"distill": {"student": "nope"}}}, "[plugins.distill] student: unknown backend 'nope'"),
    ({"exact": "ttr"}, "[root] exact: backend 'ttr' is learned; the exact path needs an exact backend"),
])
def test_values_that_would_fail_or_do_nothing_later_are_refused(builtin_plugins, data, expected):
    problems = _problems(data, builtin_plugins)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_numbers_a_user_writes_naturally_are_accepted(builtin_plugins):
    cfg = validate_config({"plugins": {"ttr": {"alpha_max": 1}, "distill": {"lr": 1, "seed": SEED_MAX}},
                           "gates": [{"kind": "sigma_window", "min": 0, "max": math.inf}]}, "c", builtin_plugins)
    assert cfg.sections["ttr"].alpha_max == 1.0 and cfg.gates[0].settings.max == math.inf


def test_a_root_error_does_not_hide_the_section_errors(builtin_plugins):
    problems = _problems({"backend": 5, "training": "no", "plugins": {"ttr": {"depth": 9}, "distill": {"bogus": 1}},
                          "gates": [{"kind": "schedule", "rules": [{"backend": "hots"}]}]}, builtin_plugins)
    assert [p.split(":")[0] for p in problems] == [
        "[root] backend", "[root] training", "[plugins.ttr] depth", "[plugins.distill] bogus",
        "[gates[0] (kind 'schedule')] rules.0.backend"]


def test_layer_patterns_that_match_no_known_layer_warn_with_the_known_layers(builtin_plugins, tmp_path):
    data = {"plugins": {"distill": {"layers": ["single:9", "double:*"], "exclude": ["single:12-14"]}},
            "gates": [{"kind": "layers", "include": ["single:0-3"]},
                      {"kind": "schedule", "rules": [{"backend": "sdpa", "layers": ["dbl:*"]}]}]}
    assert validate_config(data, "c", builtin_plugins).warnings == []  # layers unknown: nothing to say
    warnings = validate_config(data, "c", builtin_plugins, layers=TESTBED_LAYERS).warnings
    known = "(double:0-1, single:0-5)"
    assert warnings == [f"[plugins.distill] layers: pattern 'single:9' matches none of the model's layers {known}",
                        f"[plugins.distill] exclude: pattern 'single:12-14' matches none of the model's layers {known}",
                        f"[gates[1] (kind 'schedule')] rules.0.layers: pattern 'dbl:*' matches none of the model's "
                        f"layers {known}"]
    path = tmp_path / "c.toml"
    path.write_text('[plugins.distill]\nlayers = ["single:9"]\n')
    res = subprocess.run([sys.executable, "-m", "attnplug.cli", "config", "validate", str(path), "--layers", "testbed"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "warning: [plugins.distill] layers: pattern 'single:9' matches none of the model's layers" in res.stderr


def test_session_check_layers_warns_once(builtin_plugins, caplog):
    s = Session({"loggers": [], "plugins": {"distill": {"layers": ["single:9"]}}}, builtin_plugins)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        assert len(s.check_layers(TESTBED_LAYERS)) == 1
        s.check_layers(TESTBED_LAYERS)
    assert sum("'single:9' matches none" in r.getMessage() for r in caplog.records) == 1


def _validate_file(path):
    return load_config(path, Plugins(builtins={"core": "attnplug.core.builtin"}, load_entry_points=False))


@pytest.mark.parametrize("name, content, expected", [
    ("binary.toml", bytes(range(256)) * 4, "not UTF-8 text: byte 0x80 at offset 128"),
    ("utf16.toml", 'backend = "sdpa"\n'.encode("utf-16"), "it looks like UTF-16: save it as UTF-8"),
    ("deep.json", b"{\"a\": " + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("deep.toml", b"a = " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_odd_config_files_give_clear_errors(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        _validate_file(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_folders_and_devices_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="a folder, expected a TOML file"):
        _validate_file(tmp_path)
    if os.path.exists("/dev/zero"):
        with pytest.raises(ConfigError, match="a character device, expected a TOML file"):
            _validate_file("/dev/zero")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_does_not_hang_config_validate(tmp_path):
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    res = subprocess.run([sys.executable, "-m", "attnplug.cli", "config", "validate", str(fifo)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "a FIFO (named pipe), expected a TOML file" in res.stderr


def test_a_huge_value_is_shown_short(builtin_plugins):
    problems = _problems({"seed": "x" * 10_000}, builtin_plugins)
    assert len(problems[0]) < 200


# ---- the checkpoint path of a config ------------------------------------------------------------------------

def test_a_checkpoint_path_that_is_a_folder_is_an_error_before_any_work(builtin_plugins, tmp_path):
    with pytest.raises(ConfigError, match=r"\[root\] checkpoint: .* is a folder, expected a checkpoint file"):
        validate_config({"checkpoint": str(tmp_path), "training": True, "distiller": "ttr"}, "c", builtin_plugins)
    cfg = validate_config({"loggers": [], "training": True, "distiller": "ttr", "backend": "ttr"}, "c", builtin_plugins)
    cfg.root = cfg.root.model_copy(update={"checkpoint": str(tmp_path)})  # as the testbed jobs override it
    with pytest.raises(CheckpointError, match="is a folder"):
        Session(cfg, builtin_plugins)


def test_a_missing_checkpoint_of_a_serving_config_says_so(builtin_plugins, tmp_path, caplog):
    missing = tmp_path / "ttr.safetensors"
    with caplog.at_level(logging.INFO, logger="attnplug"):
        Session({"loggers": [], "backend": "ttr", "checkpoint": str(missing)}, builtin_plugins)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and str(missing) in r.getMessage()]
    assert len(warned) == 1 and "serving without it" in warned[0].getMessage()
    assert validate_config({"checkpoint": str(missing)}, "c", builtin_plugins).warnings[0].startswith(
        f"[root] checkpoint: {missing} does not exist")
    with pytest.raises(ConfigError, match="does not exist.*strict = true"):
        Session({"loggers": [], "backend": "ttr", "strict": True, "checkpoint": str(missing)}, builtin_plugins)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="attnplug"):  # training starts there: no warning
        Session({"loggers": [], "backend": "ttr", "training": True, "distiller": "ttr", "checkpoint": str(missing)},
                builtin_plugins)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- fuzz: every config is refused clearly or works ---------------------------------------------------------

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["ttr", "sdpa", "host", "landmark", "per_step", "preview", "*", "single:*", "single:0-1",
                     ":2", "-1:", "false", "no", "1e3", "float32", "cosine", "stratified", "hedgehog"]),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(["a", "kind", "backend", "steps", "min"]), inner, max_size=3),
                       max_leaves=4)
_ROOT_FIELDS = ["backend", "exact", "strict", "finite_check", "training", "distiller", "mode", "shadow_exact",
                "seed", "disable_plugins"]
_GATES = ["layers", "sigma_window", "step_window", "schedule", "tokens"]
_BASES = [
    {},
    {"backend": "ttr", "training": True, "distiller": "ttr", "exact": "sdpa"},
    {"backend": "ttr", "mode": "preview", "training": True, "distiller": "ttr",
     "gates": [{"kind": "schedule", "rules": [{"backend": "sdpa", "steps": ":1"}]}]},
    {"backend": "landmark", "gates": [{"kind": "sigma_window", "min": 0.1}]},
]


def _section_fields(plugins) -> dict[str, dict[str, object]]:
    """Section → {field: default} of every plugin section."""
    return {name: {f: info.default for f, info in sorted(model.model_fields.items())}
            for name, (_, model) in plugins.config_sections().items()}


def _plausible(default: object) -> st.SearchStrategy:
    """Values of the field's own type near its default (half the mutations: they get past validation often)."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.sampled_from([default, 0, 1, -1, 2, default * 2, default // 2 + 1, 2**40])
    if isinstance(default, float):
        return st.sampled_from([default, 0.0, 1.0, -1.0, default * 10, default / 10, 1e-9, math.inf, math.nan])
    if isinstance(default, str):
        return st.sampled_from([default, "ttr", "sdpa", "landmark", "auto", "torch", "running", "call", "input"])
    return _VALUES


@st.composite
def _configs(draw, sections):
    data = {**draw(st.sampled_from(_BASES)), "loggers": []}
    data = {k: (list(v) if isinstance(v, list) else v) for k, v in data.items()}
    root = {f: SessionConfig.model_fields[f].default for f in _ROOT_FIELDS}
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["root", "section", "section", "gate"]))
        if where == "root":
            field = draw(st.sampled_from(_ROOT_FIELDS))
            data[field] = draw(_plausible(root[field]) | _VALUES)
        elif where == "section":
            name = draw(st.sampled_from(sorted(sections)))
            section = dict(data.get("plugins", {}).get(name, {}))
            field = draw(st.sampled_from(sorted(sections[name])))
            section[field] = draw(_plausible(sections[name][field]) | _VALUES)
            data["plugins"] = {**data.get("plugins", {}), name: section}
        else:
            entry = {"kind": draw(st.sampled_from(_GATES))}
            entry.update(draw(st.dictionaries(st.sampled_from(["include", "exclude", "min", "max", "steps", "rules",
                                                                "min_image_tokens", "max_image_tokens"]),
                                              _plausible(0.5) | _VALUES, max_size=2)))
            data["gates"] = list(data.get("gates", [])) + [entry]
    return data


_INF_FIELDS = {("SigmaWindowSettings", "max")}


def _assert_clean(model) -> None:
    """Every number of a validated model is finite (unless it means 'unbounded') and every seed fits int64."""
    for name, value in model:
        if isinstance(value, float):
            assert value == value and (math.isfinite(value) or (type(model).__name__, name) in _INF_FIELDS), name
        if isinstance(value, int) and not isinstance(value, bool):
            assert -(2**63) <= value < 2**63, name
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, BaseModel):
                _assert_clean(item)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_configs_are_refused_clearly_or_serve_a_call(builtin_plugins, data):
    config = data.draw(_configs(_section_fields(builtin_plugins)))
    try:
        cfg = validate_config(config, "fuzz.toml", builtin_plugins)
    except ConfigError as exc:
        assert exc.problems and all(p.startswith("[") for p in exc.problems)
        event("refused")
        return
    event("valid")
    for model in [cfg.root, *cfg.sections.values(), *(g.settings for g in cfg.gates if g.settings is not None)]:
        _assert_clean(model)
    session = Session(cfg, builtin_plugins)  # a valid config builds
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    call = AttentionCall("single:0", block_type="single", block_index=0, sigma=0.5, step_index=0, num_steps=4,
                         n_cond_tokens=4, n_image_tokens=16, latent_grid=(4, 4), host="test")
    try:
        out = session.attention(q, k, v, call)
    except ApproximationError:
        assert cfg.root.strict  # only strict mode may refuse to fall back
        return
    finally:
        session.close()
    assert out.shape == q.shape and bool(torch.isfinite(out).all())
