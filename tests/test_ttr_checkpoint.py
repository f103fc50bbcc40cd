"""ttr checkpoints through Session.save / Session.load: bit-exact round trip, refusals, precedence logging."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from attnplug.core import AttentionCall, CheckpointError, LayerSpec, Plugins, Session, load_checkpoint
from attnplug.plugins.ttr.state import FORMAT

BUILTINS = {"core": "attnplug.core.builtin", "landmark": "attnplug.plugins.landmark.plugin",
            "ttr": "attnplug.plugins.ttr.plugin"}
TTR = {"feature_dim": 32, "hidden": 48, "depth": 3, "per_head": True}


def _session(ttr: dict | None = None, **root) -> Session:
    cfg = {"backend": "ttr", "exact": "sdpa", "loggers": [], "plugins": {"ttr": dict(TTR if ttr is None else ttr)}}
    cfg.update(root)
    return Session(cfg, Plugins(builtins=BUILTINS, load_entry_points=False))


def _trained(tmp_path: Path) -> tuple[Session, Path]:
    """A session with two built layers whose weights are not the init, one ready, one with sticky chunks."""
    s = _session()
    b = s.backends.get("ttr")
    for key, heads in (("double:0", 2), ("single:3", 2)):
        layer = b.layer(LayerSpec(key, heads, 16))
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    b.ready["single:3"] = True
    b.set_layer_chunks("double:0", 64, 32)
    path = tmp_path / "ttr.safetensors"
    s.save(path)
    return s, path


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    a, path = _trained(tmp_path)
    b = _session()
    b.load(path)
    ta, tb = a.backends.get("ttr"), b.backends.get("ttr")
    assert sorted(tb.layers) == ["double:0", "single:3"]
    for key in ta.layers:
        sa, sb = ta.layers[key].state_dict(), tb.layers[key].state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:
            assert sa[name].dtype == sb[name].dtype == torch.float32
            assert torch.equal(sa[name], sb[name]), (key, name)
    assert tb.ready == {"double:0": False, "single:3": True}
    assert tb.chunks == {"double:0": (64, 32)}
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    call = AttentionCall("single:3", n_cond_tokens=8, n_image_tokens=32, sigma=0.4)
    assert torch.equal(ta(q, k, v, call), tb(q, k, v, call))
    # saving the loaded state again gives identical tensors
    again = tmp_path / "again.safetensors"
    b.save(again)
    c1, c2 = load_checkpoint(path)["backend.ttr"], load_checkpoint(again)["backend.ttr"]
    assert c1[1] == c2[1] and c1[1]["format"] == FORMAT
    assert all(torch.equal(c1[0][n], c2[0][n]) for n in c1[0]) and c1[0].keys() == c2[0].keys()


def test_checkpoint_loaded_at_session_start(tmp_path: Path) -> None:
    _, path = _trained(tmp_path)
    s = _session(checkpoint=str(path))
    assert s.backends.get("ttr").ready["single:3"] is True


def _snapshot(session: Session) -> dict[str, torch.Tensor]:
    b = session.backends.get("ttr")
    return {f"{k}/{n}": t.clone() for k, m in b.layers.items() for n, t in m.state_dict().items()}


def test_architecture_mismatch_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    _, path = _trained(tmp_path)
    other = _session({**TTR, "feature_dim": 64, "activation": "hedgehog"})
    tb = other.backends.get("ttr")
    tb.layer(LayerSpec("single:3", 2, 16))
    before = _snapshot(other)
    with pytest.raises(CheckpointError) as err:
        other.load(path)
    msg = str(err.value)
    assert "feature_dim: checkpoint has 32, config has 64" in msg and "activation" in msg and str(path) in msg
    after = _snapshot(other)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert tb.ready == {} and tb.chunks == {}


def test_layer_spec_mismatch_is_refused(tmp_path: Path) -> None:
    _, path = _trained(tmp_path)
    other = _session()
    tb = other.backends.get("ttr")
    tb.layer(LayerSpec("double:0", 4, 16))  # the model has 4 heads on this layer
    with pytest.raises(CheckpointError, match="double:0: checkpoint has 2 heads x 16, the model has 4 heads x 16"):
        other.load(path)
    assert tb.specs["double:0"].heads == 4 and "single:3" not in tb.layers


def test_truncated_checkpoint_gives_clear_error_and_file_untouched(tmp_path: Path) -> None:
    _, path = _trained(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    other = _session()
    with pytest.raises(CheckpointError, match="truncated"):
        other.load(bad)
    assert bad.read_bytes() == data[: len(data) // 2]
    assert other.backends.get("ttr").layers == {}


def test_save_over_existing_file_is_atomic(tmp_path: Path) -> None:
    a, path = _trained(tmp_path)
    before = path.read_bytes()
    b = a.backends.get("ttr")
    original = b.state
    b.state = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        a.save(path)
    b.state = original  # type: ignore[method-assign]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_tampered_tensors_are_named(tmp_path: Path) -> None:
    from attnplug.core import save_checkpoint
    _, path = _trained(tmp_path)
    tensors, meta = load_checkpoint(path)["backend.ttr"]
    bad_shape = dict(tensors)
    bad_shape["single:3/alpha_logit"] = torch.zeros(5)
    p1 = save_checkpoint(tmp_path / "shape.safetensors", {"backend.ttr": (bad_shape, meta)})
    with pytest.raises(CheckpointError, match=r"single:3: tensor alpha_logit has shape \(5,\), expected \(2,\)"):
        _session().load(p1)
    missing = {n: t for n, t in tensors.items() if n != "double:0/phi_q.weights.0"}
    p2 = save_checkpoint(tmp_path / "missing.safetensors", {"backend.ttr": (missing, meta)})
    with pytest.raises(CheckpointError, match=r"missing \['phi_q.weights.0'\]"):
        _session().load(p2)
    p3 = save_checkpoint(tmp_path / "format.safetensors", {"backend.ttr": (tensors, {**meta, "format": "other"})})
    with pytest.raises(CheckpointError, match="format 'other'"):
        _session().load(p3)


def test_runtime_fields_config_wins_and_is_logged(tmp_path: Path, caplog) -> None:
    _, path = _trained(tmp_path)
    other = _session({**TTR, "key_chunk": 7, "eps": 1e-5, "alpha_init": 0.3})
    with caplog.at_level(logging.INFO, logger="attnplug"):
        other.load(path)
    tb = other.backends.get("ttr")
    assert tb.settings.key_chunk == 7 and tb.settings.eps == 1e-5
    assert "key_chunk is 1024 in the file and 7 in the config; the config wins" in caplog.text
    assert "eps" in caplog.text and "alpha_init" in caplog.text and "keep their learned values" in caplog.text


def test_landmark_window_difference_is_a_warning(tmp_path: Path, caplog) -> None:
    """A checkpoint distilled with a landmark window, loaded without one: the config wins, loudly."""
    windowed = _session(plugins={"ttr": dict(TTR), "landmark": {"window": 2}})
    windowed.backends.get("ttr").layer(LayerSpec("single:0", 2, 16))
    path = tmp_path / "windowed.safetensors"
    windowed.save(path)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        _session(plugins={"ttr": dict(TTR), "landmark": {"window": 0}}).load(path)  # explicitly without a window
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("landmark settings differ" in m and "'window': (2, 0)" in m and "the config wins" in m
               for m in warnings), warnings


def test_exact_branch_precision_is_no_difference_from_the_file(tmp_path: Path, caplog) -> None:
    """Distilled in full precision (training always is), served with the exact branch in FP8: the layers were trained
    against the same branch, so nothing is reported; another window still is."""
    full = _session(plugins={"ttr": dict(TTR), "landmark": {"window": 2}})
    full.backends.get("ttr").layer(LayerSpec("single:0", 2, 16))
    path = tmp_path / "full.safetensors"
    full.save(path)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        _session(plugins={"ttr": dict(TTR), "landmark": {"window": 2, "precision": "fp8"}}).load(path)
    assert not [r for r in caplog.records if "landmark settings differ" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        _session(plugins={"ttr": dict(TTR), "landmark": {"window": 1, "precision": "fp8"}}).load(path)
    assert [r for r in caplog.records if "'window': (2, 1)" in r.getMessage()]
