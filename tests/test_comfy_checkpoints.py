"""A checkpoint's life in ComfyUI, against the stand-in: Apply reads a checkpoint again when it changed on disk
(fingerprint and plan cache), Distill refuses a checkpoint of another model before sampling (and at a layer's
first call for models that do not tell their shapes) and never overwrites it, a failed save is the sampler
node's error and keeps the training for the next save, and a run that trained nothing rewrites nothing."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference  # fixtures: the stand-in per module, inference_mode per test


def _folder() -> Path:
    from attnplug.hosts.comfy.files import model_folders

    return model_folders()[0]


def _snapshot(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def _distill(model, name, **kw):
    from attnplug.hosts.comfy.nodes import NEW_CHECKPOINT, AttnplugDistill

    return AttnplugDistill.execute(model=model, checkpoint=NEW_CHECKPOINT, new_checkpoint=name, distiller="ttr",
                                   mode="passthrough", config=stub.distill_config(), **kw)[0]


# ---- Apply: a changed checkpoint is read again ---------------------------------------------------------------

def test_apply_reads_a_changed_checkpoint_again(comfy, caplog, monkeypatch):
    stub.need_ttr_distiller()
    from attnplug.hosts.comfy import plans
    from attnplug.hosts.comfy.nodes import AttnplugApply

    path = _folder() / "growing.safetensors"
    stub.ttr_checkpoint(path, ready={"single:0"})
    reads = []
    real_read = plans.ApplyPlan._read
    monkeypatch.setattr(plans.ApplyPlan, "_read", lambda self, fp: reads.append(fp) or real_read(self, fp))
    name = "growing.safetensors"
    before = AttnplugApply.fingerprint_inputs(checkpoint=name, quality_speed=1.0)
    model = AttnplugApply.execute(model=stub.tiny_model(), checkpoint=name, quality_speed=1.0,
                                  config=stub.ttr_config())[0]

    def ttr_layers():
        _, served = stub.sample_served(model, steps=2)
        return {k for k, v in served.items() if v.get("ttr")}

    assert ttr_layers() == {"single:0"} and ttr_layers() == {"single:0"}
    assert len(reads) == 1  # an unchanged file is not read again
    stub.ttr_checkpoint(path, ready={"double:0", "double:1", "single:0", "single:1"})  # more distillation since
    assert AttnplugApply.fingerprint_inputs(checkpoint=name, quality_speed=1.0) != before  # ComfyUI re-runs Apply
    with caplog.at_level(logging.INFO, logger="attnplug"):
        # ...and a cached Apply output serves the new file too
        assert ttr_layers() == {"double:0", "double:1", "single:0", "single:1"}
    assert len(reads) == 2
    assert any("changed on disk and was read again: 4 of 4 ready layers may serve (before: 1 of 1)" in r.getMessage()
               for r in caplog.records)


def test_fingerprint_follows_the_file(comfy, tmp_path):
    from attnplug.hosts.comfy.files import fingerprint

    path = tmp_path / "f.safetensors"
    assert fingerprint(path) == (str(path), None)
    path.write_bytes(b"1234")
    first = fingerprint(path)
    assert fingerprint(path) == first
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    assert fingerprint(path) != first
    second = fingerprint(path)
    tmp = tmp_path / "f.tmp"
    tmp.write_bytes(b"1234")
    os.utime(tmp, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    os.replace(tmp, path)  # an atomic rewrite: same size, same mtime, another inode
    assert fingerprint(path) != second


# ---- Distill: a checkpoint of another model is refused, never overwritten ------------------------------------------

def test_distill_refuses_a_checkpoint_of_another_model_before_sampling(comfy):
    stub.need_ttr_distiller()
    from attnplug.core.checkpoint import CheckpointError
    from attnplug.hosts.comfy.nodes import AttnplugApply

    path = _folder() / "two_heads.safetensors"
    stub.ttr_checkpoint(path, ready={"single:0"}, heads=2)
    before = _snapshot(path)
    four_heads = stub.tiny_model(heads=4)
    with pytest.raises(CheckpointError, match=r"two_heads.safetensors was trained on another model and is left "
                                              r"untouched: 4 of its 4 layers do not fit: double:0 \(2 heads × 16 in "
                                              r"the file, 4 × 8 in this model\)"):
        _distill(four_heads, "two_heads")
    with pytest.raises(CheckpointError, match="trained on another model"):
        AttnplugApply.execute(model=four_heads, checkpoint="two_heads.safetensors", quality_speed=1.0,
                              config=stub.ttr_config())
    assert _snapshot(path) == before
    _distill(stub.tiny_model(heads=2), "two_heads")  # the model it was trained on is fine


def test_a_model_that_hides_its_shapes_is_checked_at_the_first_call(comfy, monkeypatch):
    stub.need_ttr_distiller()
    from attnplug.core.checkpoint import CheckpointError
    from attnplug.hosts.comfy import current_binding, plans

    path = _folder() / "hidden_shapes.safetensors"
    stub.ttr_checkpoint(path, ready=set(), heads=2)
    before = _snapshot(path)
    monkeypatch.setattr(plans, "model_layer_shapes", lambda patcher: None)  # e.g. a model without Flux's blocks
    model = _distill(stub.tiny_model(heads=4), "hidden_shapes")
    with pytest.raises(CheckpointError, match="does not fit this model and is left untouched: it was trained on "
                                              "another model: layer double:0 has 2 heads × 16 in the file, this model "
                                              "sends 4 × 8"):
        stub.sample(model, steps=2)
    assert _snapshot(path) == before
    assert current_binding(model).handle.saves == 0 and current_binding(model).handle.session is None


# ---- saving: failures are errors, training is kept; no training, no save ---------------------------------------------

def test_a_failed_save_is_the_sampler_nodes_error_and_the_training_is_kept(comfy, monkeypatch):
    stub.need_ttr_distiller()
    from attnplug.core import load_checkpoint
    from attnplug.hosts.comfy import current_binding
    from attnplug.hosts.comfy.binding import CheckpointSaveError

    from attnplug.core import Session

    model = _distill(stub.tiny_model(), "blocked")
    binding = current_binding(model)
    target = Path(binding.handle.spec.checkpoint)
    save = Session.save

    def blocked_save(self, path):  # something gets in the way while sampling: the rename onto the path fails
        target.mkdir(parents=True, exist_ok=True)
        return save(self, path)

    monkeypatch.setattr(Session, "save", blocked_save)
    with pytest.raises(CheckpointSaveError, match=f"could not save checkpoint {target}: CheckpointError: .* is a folder") as err:
        stub.sample(model, steps=2, cfg=1.0)
    assert "kept in memory and saved when the next sampling run through this model ends" in str(err.value)
    kept = binding.handle.session
    assert kept is not None and not kept.closed
    first_run = kept.distiller.total_updates
    assert first_run > 0
    monkeypatch.setattr(Session, "save", save)
    shutil.rmtree(target)  # fixed
    stub.sample(model, steps=2, cfg=1.0)
    assert binding.handle.builds == 1 and binding.handle.saves == 1 and binding.handle.session is None
    meta = next(m for c, (_, m) in load_checkpoint(target).items() if c.startswith("distiller."))
    assert meta["total_updates"] > first_run  # both runs' training is in the file


def test_a_run_that_trained_nothing_does_not_rewrite_the_checkpoint(comfy, monkeypatch, caplog):
    stub.need_ttr_distiller()
    import comfy.ldm.flux.model as flux_model
    from attnplug.hosts.comfy import current_binding

    model = _distill(stub.tiny_model(), "untouched")
    stub.sample(model, steps=2, cfg=1.0)
    path = Path(current_binding(model).handle.spec.checkpoint)
    before = _snapshot(path)
    monkeypatch.setattr(flux_model, "BLOCK_INFO", False)  # nothing can be trained (calls are not identified)
    with caplog.at_level(logging.INFO, logger="attnplug"):
        out = stub.sample(model, steps=2, cfg=1.0)
    assert torch.isfinite(out).all()
    assert _snapshot(path) == before and current_binding(model).handle.saves == 1
    assert any("no attention call was trained in this run" in r.getMessage() for r in caplog.records)
