"""Which model a checkpoint's layers were distilled on: weight fingerprints, written by training sessions, compared
when a host binds a model, layers of another model withheld from serving (served exact, said once)."""
from __future__ import annotations

import logging

import pytest
import torch

from attnplug.core import model_identity
from attnplug.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _weights(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(64, 64, generator=g), scale * torch.randn(64, 64, generator=g)]


def test_fingerprints_tell_a_fine_tune_from_a_change_of_storage():
    """The same weights in bf16, fp16 or e4m3 stay one model; weights moved by 12 % (the testbed's fine-tune) or
    another model's are another; another shape is always another."""
    w = _weights(0)
    fp = model_identity.fingerprint(w)
    assert fp.shape == (2 * 256,) and fp.dtype == torch.float32
    for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        assert model_identity.distance(fp, model_identity.fingerprint([x.to(dtype) for x in w])) < \
            model_identity.OTHER_MODEL_DISTANCE, dtype
    tuned = [x + 0.12 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9)) for x in w]
    assert model_identity.distance(fp, model_identity.fingerprint(tuned)) > model_identity.OTHER_MODEL_DISTANCE
    assert model_identity.distance(fp, model_identity.fingerprint(_weights(1))) > 1.0
    assert model_identity.distance(fp, model_identity.fingerprint(w[:1])) == float("inf")
    recorded = {"single:0": fp, "single:1": fp, "single:2": fp}
    bound = {"single:0": fp.clone(), "single:1": model_identity.fingerprint(tuned), "double:0": fp}
    assert list(model_identity.differing(recorded, bound)) == ["single:1"]  # only layers both know


TINY = {"ttr": {"feature_dim": 16, "hidden": 32}}


def _session(checkpoint, training=False, **root):
    from attnplug.core import Session

    return Session({"backend": "ttr", "exact": "sdpa", "training": training, "checkpoint": str(checkpoint),
                    "loggers": [], "plugins": TINY, **({"distiller": "ttr"} if training else {}), **root})


@pytest.fixture
def stamped(tmp_path):
    """A checkpoint of two ready ttr layers, distilled on the model whose weights are `_weights(0)`, `_weights(1)`."""
    from attnplug.core import LayerSpec

    path = tmp_path / "ttr.safetensors"
    with _session(path, training=True) as session:
        session.bind_model({"single:0": model_identity.fingerprint(_weights(0)),
                            "single:1": model_identity.fingerprint(_weights(1))})
        ttr = session.backends.get("ttr")
        q = torch.randn(1, 2, 8, 16)
        for key in ("single:0", "single:1"):
            ttr.layer(LayerSpec.from_tensors(key, q), q.device)
            ttr.ready[key] = True
        session.save()
    return path


def test_a_checkpoint_records_the_model_it_was_distilled_on(stamped):
    comps = load_checkpoint(stamped)
    tensors, meta = comps[model_identity.COMPONENT]
    assert meta["format"] == model_identity.FORMAT and sorted(tensors) == ["single:0", "single:1"]
    assert torch.equal(tensors["single:0"], model_identity.fingerprint(_weights(0)))


def test_layers_of_another_model_are_withheld_and_said_once(stamped, make_call, caplog):
    """Bound to a model whose single:1 moved: single:1 is served exact with the reason, single:0 still serves; the
    warning names the layer, once; binding the original model back lifts it."""
    session = _session(stamped)
    tuned = [x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) for x in _weights(1)]
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        session.bind_model({"single:0": model_identity.fingerprint(_weights(0)),
                            "single:1": model_identity.fingerprint(tuned)})
    assert caplog.text.count("distilled on another model") == 1
    assert "1 layer(s) were distilled on another model" in caplog.text and ": single:1;" in caplog.text
    route = session.router.route(make_call("single:1"))
    assert not route.approximate and "distilled on another model" in route.reason
    assert session.router.route(make_call("single:0")).approximate
    assert any("withheld" in n and "single:1" in n for n in session.serving_notes())
    session.bind_model({"single:1": model_identity.fingerprint(_weights(1))})
    assert session.router.route(make_call("single:1")).approximate and not session.router.withheld
    session.close()
    anyway = _session(stamped, other_model="serve")
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        anyway.bind_model({"single:1": model_identity.fingerprint(tuned)})
    assert "serving them anyway" in caplog.text and anyway.router.route(make_call("single:1")).approximate
    anyway.close()


def test_a_training_session_distils_them_and_records_the_new_model(stamped, caplog):
    """Training on the other model: warned, not withheld (readiness is re-measured there), and its save records the
    bound model."""
    session = _session(stamped, training=True)
    other = model_identity.fingerprint(_weights(7))
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        session.bind_model({"single:1": other})
    assert "distilling them on this model" in caplog.text and not session.router.withheld
    session.save()
    session.close()
    tensors, _ = load_checkpoint(stamped)[model_identity.COMPONENT]
    assert torch.equal(tensors["single:1"], other)
    assert torch.equal(tensors["single:0"], model_identity.fingerprint(_weights(0)))  # kept from the file


def test_a_fingerprint_component_of_another_format_is_refused(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_checkpoint(path, {model_identity.COMPONENT: ({"single:0": torch.zeros(4)}, {"format": "other", "version": 1})})
    with pytest.raises(CheckpointError, match="component 'model': format 'other', expected 'attnplug.model'"):
        _session(path)
