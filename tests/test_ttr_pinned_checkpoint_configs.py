"""The committed checkpoints were trained on the previous defaults (α_max 0.2, landmarks 8 % / at least 64, no
window; the default is α_max 0.5, 2 % / at least 16, window r = 2): they load with their pinned configs, and a
config on the current defaults refuses them with a message that names every value to pin."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from attnplug.core import AttentionCall, CheckpointError, Session, load_checkpoint
from attnplug.core.config import load_config, read_config_file
from attnplug.plugins.landmark.settings import PREVIOUS_DEFAULTS as LM_PREVIOUS
from attnplug.plugins.landmark.settings import LandmarkSettings
from attnplug.plugins.ttr.settings import PREVIOUS_DEFAULTS as TTR_PREVIOUS
from attnplug.plugins.ttr.settings import TtrSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "testbed" / "configs"
DEFAULT_CKPT = ROOT / "testbed" / "weights" / "ttr_default.safetensors"
WINDOW_CKPT = ROOT / "testbed" / "weights" / "ttr_window.safetensors"
#: every config that serves testbed/weights/ttr_default.safetensors (the demo distils the current default; the
#: window checkpoint has its own config; serve_exact.toml serves no checkpoint; serve_single_default_layer.toml
#: serves today's layer)
SERVES_DEFAULT = sorted(p.name for p in CONFIGS.glob("*.toml") if p.name not in ("serve_single_window.toml",
                                                                                  "demo.toml", "serve_all_layers.toml",
                                                                                  "serve_all_layers_fp8.toml",
                                                                                  "serve_exact.toml",
                                                                                  "serve_single_default_layer.toml"))


def test_the_defaults_and_the_previous_ones():
    """The default layer, and what the previous default was (docs/QUALITY.md, "The default layer")."""
    t, lm = TtrSettings(), LandmarkSettings()
    assert (t.depth, t.hidden, t.feature_dim, t.activation, t.alpha_max) == (2, 256, 128, "elu+1", 0.5)
    assert (lm.fraction, lm.min, lm.max, lm.window) == (0.02, 16, 0, 2)
    assert TTR_PREVIOUS == {"alpha_max": 0.2} and LM_PREVIOUS == {"fraction": 0.08, "min": 64, "window": 0}


@pytest.mark.parametrize("name", SERVES_DEFAULT)
def test_configs_of_the_default_checkpoint_pin_its_layer(name: str):
    """Pinned in the file itself (not inherited from the defaults), so that they mean the same layer forever."""
    raw = read_config_file(CONFIGS / name)
    assert raw["plugins"]["ttr"] == {"alpha_max": 0.2}, name
    assert raw["plugins"]["landmark"] == {"fraction": 0.08, "min": 64, "window": 0}, name


@pytest.mark.parametrize("name, extra", [("serve_all_layers.toml", {}),
                                         ("serve_all_layers_fp8.toml", {"precision": "fp8"})])
def test_the_all_layer_configs_pin_todays_layer(name: str, extra: dict):
    """testbed/configs/serve_all_layers.toml serves a checkpoint of today's default layer (and the joint layer on the
    double blocks): pinned in the file too, so that a later default does not change what it serves; its FP8 twin
    differs in the exact branch's precision alone."""
    raw = read_config_file(CONFIGS / name)
    assert {k: raw["plugins"]["ttr"][k] for k in TTR_PREVIOUS} == TtrSettings().model_dump(include=set(TTR_PREVIOUS))
    assert raw["plugins"]["landmark"] == {**LandmarkSettings().model_dump(include=set(LM_PREVIOUS)), **extra}
    assert raw["plugins"]["ttr"]["joint_layers"] == ["double:*"] and set(raw["plugins"]["ttr"]["joint"]) == \
        {"combine", "log_scale"}


def test_the_default_layer_serving_config_pins_todays_layer():
    raw = read_config_file(CONFIGS / "serve_single_default_layer.toml")
    assert raw["plugins"]["ttr"] == TtrSettings().model_dump(include=set(TTR_PREVIOUS))
    assert raw["plugins"]["landmark"] == LandmarkSettings().model_dump(include=set(LM_PREVIOUS))


def _meta(path: Path) -> dict:
    return load_checkpoint(path)["backend.ttr"][1]


def test_the_demo_distils_todays_default():
    """`attnplug demo` (the README's main job) distils the product default: its config pins no layer field."""
    raw = read_config_file(CONFIGS / "demo.toml")
    assert "ttr" not in raw.get("plugins", {}) and "landmark" not in raw.get("plugins", {})
    cfg = load_config(CONFIGS / "demo.toml")
    assert cfg.section("ttr").alpha_max == TtrSettings().alpha_max
    assert cfg.section("landmark").model_dump() == LandmarkSettings().model_dump()


@pytest.mark.parametrize("config, checkpoint", [("serve_single.toml", DEFAULT_CKPT),
                                                ("serve_single_window.toml", WINDOW_CKPT)])
def test_committed_checkpoints_load_with_their_configs_without_any_difference(config, checkpoint, caplog):
    """Every architecture field matches, and the landmark branch is the one the file was trained with: nothing
    is refused and no difference is logged (the config would win over the file's landmark settings)."""
    meta = _meta(checkpoint)
    cfg = load_config(CONFIGS / config)
    # files older than the window do not record it, nor the inference-only precision (their configs keep 'input')
    saved_lm = {"window": 0, "precision": "input", **meta["landmark"]}
    assert {k: saved_lm[k] for k in LandmarkSettings.model_fields} == cfg.section("landmark").model_dump()
    with caplog.at_level(logging.INFO, logger="attnplug"):
        session = Session(CONFIGS / config)
        session.load(checkpoint)
    # a runtime setting (e.g. feature_precision) may differ: it changes no weight's meaning, the config wins by design
    differ = [r.getMessage() for r in caplog.records if ("in the file" in r.getMessage()
              and "(runtime setting)" not in r.getMessage()) or "landmark settings differ" in r.getMessage()]
    assert not differ, differ
    ttr = session.backends.get("ttr")
    assert ttr.settings.alpha_max == meta["settings"]["alpha_max"]
    assert sorted(ttr.layers) == sorted(meta["layers"])


def test_default_checkpoint_serves_the_same_layer_as_its_recorded_settings():
    """The pinned config and a config spelling out every recorded value give bit-identical outputs (the
    window's grid is present, so a window would show)."""
    meta = _meta(DEFAULT_CKPT)
    spelled = {"backend": "ttr", "exact": "sdpa", "loggers": [],
               "plugins": {"ttr": meta["settings"], "landmark": {"window": 0, **meta["landmark"]}}}
    call = AttentionCall("single:2", block_type="single", block_index=2, n_cond_tokens=64, n_image_tokens=1024,
                         latent_grid=(32, 32), sigma=0.5, cfg_scale=1.0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64 + 1024, 32, generator=g) for _ in range(3))
    outs = []
    for cfg in (CONFIGS / "serve_single.toml", spelled):
        session = Session(cfg)
        session.load(DEFAULT_CKPT)
        with torch.inference_mode():
            outs.append(session.backends.get("ttr")(q, k, v, call))
    assert torch.equal(outs[0], outs[1])


def test_default_checkpoint_with_todays_defaults_is_refused_naming_what_to_pin():
    """When file and config disagree, the message says which value wins. α_max is an architecture field (refused,
    the file's value is what to set); the landmark settings would follow the config, so the message names them."""
    cfg = {"backend": "ttr", "exact": "sdpa", "loggers": []}
    session = Session(cfg)
    with pytest.raises(CheckpointError) as err:
        session.load(DEFAULT_CKPT)
    msg = str(err.value)
    assert "ttr_default.safetensors" in msg and "backend.ttr" in msg
    assert "alpha_max: checkpoint has 0.2, config has 0.5" in msg and "set [plugins.ttr] alpha_max = 0.2" in msg
    assert "[plugins.landmark] fraction = 0.08, min = 64, window = 0" in msg
    assert "the config has fraction = 0.02, min = 16, window = 2" in msg and "the config wins" in msg
    assert not session.backends.get("ttr").layers  # refused before anything changed


def test_default_checkpoint_with_only_alpha_pinned_warns_that_the_config_wins(caplog):
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        Session({"backend": "ttr", "exact": "sdpa", "loggers": [], "plugins": {"ttr": {"alpha_max": 0.2}}}
                ).load(DEFAULT_CKPT)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("landmark settings differ" in m and "'fraction': (0.08, 0.02)" in m and "'min': (64, 16)" in m
               and "'window': (0, 2)" in m and "the config wins" in m for m in warnings), warnings
