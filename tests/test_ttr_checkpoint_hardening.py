"""Loading a checkpoint is all or nothing, and every corrupt file is a `CheckpointError` naming the file, the
component and the field or tensor — never a raw TypeError, never a half-replaced model, never an untrained layer
served as ready. A hypothesis fuzz over the metadata and tensors of a real ttr + distiller checkpoint keeps it so."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from attnplug.core import AttentionCall, CheckpointError, Plugins, Session

BUILTINS = {"core": "attnplug.core.builtin", "landmark": "attnplug.plugins.landmark.plugin",
            "ttr": "attnplug.plugins.ttr.plugin"}
LAYERS = ("single:0", "single:1")
CONFIG = {
    "backend": "ttr", "exact": "sdpa", "loggers": [], "training": True, "distiller": "ttr", "mode": "preview",
    "plugins": {"ttr": {"feature_dim": 16, "hidden": 16}, "landmark": {"window": 0},
                "distill": {"query_cap": 8, "readiness_min_updates": 2, "readiness_threshold": 0.9,
                            "replay_per_layer": 2, "save_replay": True, "log_every": 0, "layer_log_every": 0}},
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _session() -> Session:
    return Session(copy.deepcopy(CONFIG), Plugins(builtins=BUILTINS, load_entry_points=False))


def _call(key: str, step: int) -> AttentionCall:
    return AttentionCall(key, "single", int(key[-1]), sigma=1 - step / 4, step_index=step, num_steps=4,
                         n_cond_tokens=4, n_image_tokens=16, latent_grid=(4, 4), host="test")


def _train(session: Session, seed: int, runs: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(runs):
        session.run_start(num_steps=4)
        for step in range(4):
            for key in LAYERS:
                q, k, v = (torch.randn(1, 2, 20, 8, generator=gen) for _ in range(3))
                session.attention(q, k, v, _call(key, step))
        session.run_end()


def _state(session: Session) -> dict:
    """Everything a load may change, to compare before and after a refused one."""
    b, d = session.backends.get("ttr"), session.distiller
    weights = {f"{k}/{n}": t.clone() for k, m in b.layers.items() for n, t in m.state_dict().items()}
    return {"weights": weights, "ready": dict(b.ready), "chunks": dict(b.chunks), "specs": dict(b.specs),
            "updates": d.total_updates, "readiness": {k: r.to_json() for k, r in d.readiness.items()},
            "rng": d.rng.get_state().clone(), "caps": dict(d.query_caps),
            "replay": (len(d.replay), d.replay.bytes_used),
            "pending": sorted(d._pending_opt), "trainers": sorted(d.trainers), "known": list(d.selector.known)}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "weights":
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][n], b[key][n]) for n in a[key])
        elif key == "rng":
            assert torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A real checkpoint: two ttr layers, distiller state with optimizer states, readiness and replay."""
    s = _session()
    _train(s, seed=1)
    assert s.distiller.total_updates > 0 and any(s.backends.get("ttr").ready.values())
    path = tmp_path_factory.mktemp("ckpt") / "ttr.safetensors"
    s.save(path)
    return path


@pytest.fixture(scope="module")
def live() -> Session:
    """A session with unsaved training of its own (different weights than the saved file)."""
    s = _session()
    _train(s, seed=2, runs=1)
    return s


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as fh:
        header = json.loads(fh.metadata()["attnplug"])
    return load_file(str(path)), header


def _write(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    save_file(tensors, str(path), metadata={"attnplug": json.dumps(header)})
    return path


def _refused(session: Session, path: Path, *expected: str) -> str:
    before = _state(session)
    with pytest.raises(CheckpointError) as err:
        session.load(path)
    _assert_same(before, _state(session))
    message = str(err.value)
    assert str(path) in message
    for text in expected:
        assert text in message, message
    return message


def test_a_refused_distiller_component_leaves_the_live_weights_unchanged(saved, live, tmp_path):
    tensors, header = _read(saved)
    header["components"]["distiller.ttr"]["total_updates"] = "many"
    _refused(live, _write(tmp_path / "bad.safetensors", tensors, header),
             "component distiller.ttr", "field total_updates: got \"many\", expected an integer")
    fresh = _session()
    fresh.load(saved)  # the intact file loads
    assert fresh.distiller.total_updates > 0


def test_ready_must_be_a_json_boolean(saved, live, tmp_path):
    tensors, header = _read(saved)
    header["components"]["backend.ttr"]["layers"]["single:0"]["ready"] = "false"
    _refused(live, _write(tmp_path / "bad.safetensors", tensors, header),
             "component backend.ttr", "field layers.single:0.ready: got \"false\", expected true or false")


@pytest.mark.parametrize("heads, expected", [
    (500_000_000, "field layers.single:0.heads: got 500000000, expected an integer in [1, 4096]"),
    (4000, "tensor alpha_logit has shape (2,), expected (4000,)"),
])
def test_impossible_shapes_are_refused_before_anything_is_allocated(saved, tmp_path, monkeypatch, heads, expected):
    tensors, header = _read(saved)
    header["components"]["backend.ttr"]["layers"]["single:0"]["heads"] = heads
    live = _session()  # knows no layer yet: only the file's tensors can contradict its declared shapes
    backend = live.backends.get("ttr")
    devices = []
    real = type(backend).build_layer

    def recording(self, spec):
        devices.append(torch.get_default_device().type)
        return real(self, spec)

    monkeypatch.setattr(type(backend), "build_layer", recording)
    t0 = time.perf_counter()
    _refused(live, _write(tmp_path / "bad.safetensors", tensors, header), "component backend.ttr", expected)
    assert time.perf_counter() - t0 < 5.0
    assert set(devices) <= {"meta"}, "no real layer was built for a file that is refused"


def test_a_distiller_entry_for_a_layer_the_file_lacks_is_refused(saved, tmp_path):
    tensors, header = _read(saved)
    del header["components"]["backend.ttr"]["layers"]["single:1"]
    tensors = {n: t for n, t in tensors.items() if not n.startswith("backend.ttr/single:1/")}
    s = _session()
    message = _refused(s, _write(tmp_path / "bad.safetensors", tensors, header), "component distiller.ttr",
                       "(single:1) was trained, but the file holds no weights of backend 'ttr'")
    assert not s.backends.get("ttr").ready  # the untrained layer is not served as ready
    assert "single:1" in message


@pytest.mark.parametrize("prefix, component", [("backend.ttr/single:0/", "backend.ttr"),
                                               ("distiller.ttr/layer0/opt/", "distiller.ttr")])
def test_non_finite_weights_and_optimizer_states_are_refused_naming_the_tensor(saved, live, tmp_path, prefix,
                                                                                component):
    tensors, header = _read(saved)
    name = next(n for n, t in tensors.items() if n.startswith(prefix) and t.is_floating_point() and t.numel() > 1)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    _refused(live, _write(tmp_path / "bad.safetensors", tensors, header), f"component {component}",
             f"tensor {name.split('/', 1)[1]!r} holds non-finite values")


@pytest.mark.parametrize("component, path, value, expected", [
    ("backend.ttr", ["layers", "single:0"], [2, 8], "field layers.single:0: got list, expected an object"),
    ("backend.ttr", ["layers", "single:0", "heads"], True,
     "field layers.single:0.heads: got true, expected an integer"),
    ("backend.ttr", ["layers", "single:0", "chunks"], [0, 4], "chunks must be [key_chunk, query_chunk]"),
    ("backend.ttr", ["settings"], "x", "field settings: got \"x\", expected an object"),
    ("backend.ttr", ["version"], True, "ttr state version True"),
    ("distiller.ttr", ["layers", 0, "readiness", "updates"], [3], "field layers[0].readiness.updates: got list"),
    ("distiller.ttr", ["layers", 0, "readiness", "ema_cos"], float("nan"), "layers[0].readiness.ema_cos: got NaN"),
    ("distiller.ttr", ["layers", 0, "query_cap"], 0, "field layers[0].query_cap: got 0"),
    ("distiller.ttr", ["layers", 0], "single:0", "field layers[0]: expected an object"),
    ("distiller.ttr", ["flush_counts"], {"run_end": -1}, "field flush_counts.run_end: got -1"),
    ("distiller.ttr", ["known_layers"], ["single:0", 3], "field known_layers: got list, expected a list of strings"),
    ("distiller.ttr", ["replay", "records", 0, "call", "sigma"], "high", "replay.records[0].call.sigma: got 'high'"),
    ("distiller.ttr", ["replay", "records", 0, "call", "nope"], 1, "replay.records[0].call.nope: not a field"),
    ("distiller.ttr", ["replay", "counters", "pushed"], 1.5, "field replay.counters.pushed: got 1.5"),
    ("distiller.ttr", ["last_sigma"], float("inf"), "field last_sigma: got Infinity, expected a finite number"),
])
def test_corrupt_metadata_names_file_component_and_field(saved, live, tmp_path, component, path, value, expected):
    tensors, header = _read(saved)
    node = header["components"][component]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _refused(live, _write(tmp_path / "bad.safetensors", tensors, header), f"component {component}", expected)


# ---- fuzz -------------------------------------------------------------------------------------------------

_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=5), st.sampled_from(["false", "true", "single:0", "layer0", "ttr"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=4)


def _paths(node, prefix=()):
    """Every (container path, key) in a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix, key
        yield from _paths(child, prefix + (key,))


@st.composite
def _corruptions(draw, header, tensor_names):
    """One to three corruptions of the metadata (replace, delete, add) or of a tensor (NaN, shape, dtype, drop)."""
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) == 0:
            ops.append(("tensor", draw(st.sampled_from(tensor_names)),
                        draw(st.sampled_from(["nan", "inf", "shape", "dtype", "drop", "huge"]))))
        else:
            paths = list(_paths(header["components"]))
            where, key = draw(st.sampled_from(paths))
            ops.append(("meta", where, key, draw(st.sampled_from(["replace", "delete", "add"])), draw(_JSON)))
    return ops


def _apply(tensors, header, ops):
    tensors, header = dict(tensors), copy.deepcopy(header)
    for op in ops:
        if op[0] == "tensor":
            _, name, how = op
            if name not in tensors:
                continue
            t = tensors[name]
            if how == "drop":
                del tensors[name]
            elif how in ("nan", "inf") and t.is_floating_point() and t.numel():
                t = t.clone()
                t.view(-1)[-1] = float(how)
                tensors[name] = t
            elif how == "shape":
                tensors[name] = torch.zeros(t.numel() + 1, dtype=t.dtype)
            elif how == "dtype":
                tensors[name] = t.to(torch.int32) if t.is_floating_point() else t.float()
            elif how == "huge":
                tensors[name] = torch.zeros(3, 1, 1, dtype=t.dtype)
            continue
        _, where, key, how, value = op
        node = header["components"]
        try:
            for k in where:
                node = node[k]
            if how == "replace":
                node[key] = value
            elif how == "delete":
                del node[key]
            elif isinstance(node, dict):
                node[f"{key}_extra"] = value
            else:
                node.append(value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier corruption removed this path
    return tensors, header


@pytest.fixture(scope="module")
def original(saved):
    return _read(saved)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_checkpoints_load_completely_or_not_at_all(original, live, tmp_path, data):
    tensors, header = original
    ops = data.draw(_corruptions(header, sorted(tensors)))
    bad_tensors, bad_header = _apply(tensors, header, ops)
    path = tmp_path / "fuzz.safetensors"
    _write(path, bad_tensors, bad_header)
    before = _state(live)
    try:
        live.load(path)
    except CheckpointError as exc:
        event("refused")
        _assert_same(before, _state(live))
        assert str(path) in str(exc)
    else:
        event("loaded")
        backend = live.backends.get("ttr")
        assert all(type(r) is bool for r in backend.ready.values())
        assert all(bool(torch.isfinite(t).all()) for m in backend.layers.values() for t in m.state_dict().values())
    # whatever happened, sampling (and training) goes on without raising
    live.run_start(num_steps=4)
    for key in LAYERS:
        q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
        out = live.attention(q, k, v, _call(key, 0))
        assert out.shape == q.shape and bool(torch.isfinite(out).all())
    live.run_end()
