"""Checkpoints: safetensors + JSON, atomic writes, clear errors, target untouched on failure."""
from __future__ import annotations

import pytest
import torch

from attnplug.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _components():
    return {"backend.x": ({"w": torch.randn(3, 4), "b": torch.arange(5)}, {"format": "x", "layers": ["single:0"]}),
            "distiller.y": ({"step": torch.tensor(7)}, {"ema": {"single:0": 0.1}})}


def test_round_trip_is_bit_exact(tmp_path):
    comps = _components()
    path = save_checkpoint(tmp_path / "sub" / "ck.safetensors", comps)
    back = load_checkpoint(path)
    assert set(back) == set(comps)
    for name, (tensors, meta) in comps.items():
        assert back[name][1] == meta
        for key, t in tensors.items():
            assert torch.equal(back[name][0][key], t) and back[name][0][key].dtype == t.dtype


def test_inference_tensors_can_be_saved(tmp_path):
    with torch.inference_mode():
        t = torch.randn(4)
        save_checkpoint(tmp_path / "ck.safetensors", {"c": ({"t": t}, {})})
    assert torch.equal(load_checkpoint(tmp_path / "ck.safetensors")["c"][0]["t"], t)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "ck.safetensors", _components())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ck.safetensors: not a readable safetensors file"):
        load_checkpoint(path)


def test_foreign_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not an attnplug checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_failed_write_leaves_target_untouched(tmp_path):
    path = save_checkpoint(tmp_path / "ck.safetensors", _components())
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_checkpoint(path, {"c": ({"bad": "not a tensor"}, {})})
    with pytest.raises(ValueError):
        save_checkpoint(path, {"c": ({"x": torch.zeros(1)}, {"nan": float("nan")})})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # no temp files left behind
