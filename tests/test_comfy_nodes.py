"""ComfyUI's main attnplug nodes against the stand-in: schemas (tooltips, categories), the config node (files in
ComfyUI's input folder, errors naming the file), schedule routing and layer-pattern checks, the checkpoint
dropdowns over every attnplug model folder, and Apply serving the best ready layers of a checkpoint."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference  # fixtures: the stand-in per module, inference_mode per test


def _need_ttr():
    from attnplug.hosts.comfy.configs import learned_backends

    if "ttr" not in learned_backends():
        pytest.skip("ttr backend not registered")


# ---- schemas -----------------------------------------------------------------------------------------

def test_every_node_has_a_valid_schema_with_tooltips(comfy):
    from comfy_api.latest import io

    for node in stub.all_nodes():
        assert issubclass(node, io.ComfyNode)
        schema = node.GET_SCHEMA()  # validates unique ids, tooltips on every input, combo defaults
        assert schema.category.startswith("attnplug/"), schema.node_id
        assert schema.inputs and all(i.tooltip for i in schema.inputs)
        assert all(o.display_name and o.tooltip for o in schema.outputs)  # else the UI labels outputs by io type
        assert schema.node_id.startswith("Attnplug")


def test_config_socket_is_one_typed_custom_type(comfy):
    from attnplug.hosts.comfy import nodes

    types = set()
    for node in (nodes.AttnplugConfig, nodes.AttnplugSchedule, nodes.AttnplugDistill, nodes.AttnplugApply):
        s = node.GET_SCHEMA()
        types |= {i.io_type for i in s.inputs if i.id == "config"}
        types |= {o.io_type for o in s.outputs if o.display_name == "config"}
    assert types == {"ATTNPLUG_CONFIG"}


# ---- config node ---------------------------------------------------------------------------------------

def test_config_node_from_widgets_and_extra_toml(comfy):
    from attnplug.core import ConfigError
    from attnplug.hosts.comfy.nodes import AttnplugConfig

    out = AttnplugConfig.execute(config_path="", backend="sdpa", exact="sdpa", strict=True, seed=3,
                                 extra_toml='[[gates]]\nkind = "sigma_window"\nmax = 0.5\n')
    cfg = out[0]
    assert cfg["backend"] == "sdpa" and cfg["exact"] == "sdpa" and cfg["strict"] is True and cfg["seed"] == 3
    assert cfg["gates"] == [{"kind": "sigma_window", "max": 0.5}]
    with pytest.raises(ConfigError, match="attnplug Config node") as err:
        AttnplugConfig.execute(config_path="", backend="sdpa", exact="sdpa", strict=False, seed=0,
                               extra_toml="[plugins.nope]\nx = 1\n")
    assert "<dict>" not in str(err.value)


def test_config_node_loads_a_file_and_errors_name_it(comfy, tmp_path):
    import folder_paths
    from attnplug.core import ConfigError
    from attnplug.hosts.comfy.nodes import AttnplugConfig

    good = tmp_path / "c.toml"
    good.write_text('backend = "sdpa"\nexact = "sdpa"\nseed = 9\n')
    cfg = AttnplugConfig.execute(config_path=str(good), backend="host", exact="host", strict=False, seed=0)[0]
    assert cfg["seed"] == 9 and cfg["backend"] == "sdpa"  # the file wins over the widgets
    bad = tmp_path / "bad.toml"
    bad.write_text('backend = "sdpa"\nbakend = "x"\n')
    with pytest.raises(ConfigError, match="bakend") as err:
        AttnplugConfig.execute(config_path=str(bad), backend="host", exact="host", strict=False, seed=0)
    assert str(bad) in str(err.value) and "<dict>" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown backend"):
        AttnplugConfig.execute(config_path="", backend="nope", exact="host", strict=False, seed=0)
    # a relative name is a file in ComfyUI's input folder, not in the working directory
    (Path(folder_paths.get_input_directory()) / "mine.toml").write_text('backend = "sdpa"\nseed = 4\n')
    assert AttnplugConfig.execute(config_path="mine.toml", backend="host", exact="host", strict=False,
                                  seed=0)[0]["seed"] == 4
    with pytest.raises(ConfigError, match="cannot read") as err:
        AttnplugConfig.execute(config_path="missing.toml", backend="host", exact="host", strict=False, seed=0)
    assert folder_paths.get_input_directory() in str(err.value)


# ---- schedule node: routing through a sampling run ----------------------------------------------------------

def test_schedule_node_routes_steps_and_layers(comfy):
    """Exact (host kernel) on the first and last step; sdpa on single blocks in between; exact elsewhere."""
    import comfy.ldm.modules.attention as attn
    from attnplug.hosts.comfy.nodes import NO_CHECKPOINT, AttnplugApply, AttnplugConfig, AttnplugSchedule

    cfg = AttnplugConfig.execute(config_path="", backend="sdpa", exact="host", strict=False, seed=0,
                                 extra_toml="loggers = []")[0]
    sched = AttnplugSchedule.execute(config=cfg, exact_first_steps=1, exact_last_steps=1, backend="sdpa", steps="",
                                     layers="single:*", otherwise="exact")[0]
    assert "gates" not in cfg  # the input config is not mutated (ComfyUI caches node outputs)
    model = AttnplugApply.execute(model=stub.tiny_model(), checkpoint=NO_CHECKPOINT, quality_speed=1.0,
                                  config=sched)[0]
    attn.KERNEL_CALLS.clear()
    _, stats = stub.sample_served(model, steps=5)
    # 4 layers per step: host kernel for all 4 on steps 0 and 4, only the 2 double blocks on steps 1-3
    assert len(attn.KERNEL_CALLS) == 4 + 3 * 2 + 4
    assert stats["single:0"] == {"host": 2, "sdpa": 3} and stats["single:1"] == {"host": 2, "sdpa": 3}
    assert stats["double:0"] == {"host": 5} and stats["double:1"] == {"host": 5}


def test_schedule_nodes_chain_rules_in_order(comfy):
    from attnplug.hosts.comfy.nodes import AttnplugSchedule

    base = {"backend": "sdpa", "exact": "host"}
    one = AttnplugSchedule.execute(config=base, exact_first_steps=2, exact_last_steps=0, backend="(config)",
                                   steps="2-5", layers="double:*", otherwise="(config)")[0]
    two = AttnplugSchedule.execute(config=one, exact_first_steps=0, exact_last_steps=1, backend="host", steps="",
                                   layers="single:0, single:1", otherwise="exact")[0]
    rules = two["gates"][0]["rules"]
    assert rules == [{"backend": "host", "steps": ":2"}, {"backend": "sdpa", "layers": ["double:*"], "steps": "2-5"},
                     {"backend": "host", "steps": "-1:"}, {"backend": "host", "layers": ["single:0", "single:1"]},
                     {"backend": "host"}]
    with pytest.raises(Exception, match="step range"):
        AttnplugSchedule.execute(config=base, exact_first_steps=0, exact_last_steps=0, backend="sdpa", steps="x-y",
                                 layers="*", otherwise="exact")


@pytest.mark.parametrize("layers, match", [("singel:*", r"unknown block type 'singel' \(did you mean 'single'\?\)"),
                                           ("transformer:3", "block types double, single"),
                                           ("single", "names no block index"),
                                           ("single:x", "block index must be a number"),
                                           ("single:5-2", "after its end")])
def test_schedule_node_rejects_layer_patterns_that_match_nothing(comfy, layers, match):
    from attnplug.hosts.comfy.nodes import AttnplugSchedule

    with pytest.raises(ValueError, match=match):
        AttnplugSchedule.execute(config={"backend": "sdpa"}, exact_first_steps=0, exact_last_steps=0, backend="sdpa",
                                 steps="", layers=layers, otherwise="exact")


def test_schedule_node_accepts_the_patterns_its_tooltip_names(comfy):
    from attnplug.hosts.comfy.nodes import AttnplugSchedule

    out = AttnplugSchedule.execute(config={"backend": "sdpa"}, exact_first_steps=0, exact_last_steps=0,
                                   backend="sdpa", steps="", layers="single:*, double:0 single:3-20 *:1 *",
                                   otherwise="exact")[0]
    assert out["gates"][0]["rules"][0]["layers"] == ["single:*", "double:0", "single:3-20", "*:1", "*"]


# ---- checkpoint inputs: every attnplug model folder, dropdowns -------------------------------------------------

def _options(node, name):
    return next(i for i in node.GET_SCHEMA().inputs if i.id == name).options


def test_checkpoint_inputs_list_the_files_of_every_attnplug_folder(comfy, tmp_path, monkeypatch):
    import asyncio

    import folder_paths
    from attnplug.hosts.comfy import files
    from attnplug.hosts.comfy.extension import comfy_entrypoint
    from attnplug.hosts.comfy.nodes import NEW_CHECKPOINT, AttnplugApply, AttnplugDistill

    monkeypatch.delitem(folder_paths.folder_names_and_paths, "attnplug", raising=False)  # as at ComfyUI's start
    extra = tmp_path / "extra_models"  # a folder extra_model_paths.yaml registered before attnplug loaded
    folder_paths.add_model_folder_path("attnplug", str(extra))
    asyncio.run(comfy_entrypoint().on_load())
    default = Path(folder_paths.models_dir) / "attnplug"
    assert files.model_folders() == [extra, default]  # the registered folder keeps its place, the default joins
    (extra / "sub").mkdir(parents=True)
    default.mkdir(parents=True, exist_ok=True)
    for path in (extra / "a.safetensors", extra / "sub" / "b.safetensors", default / "c.safetensors"):
        path.write_bytes(b"x")
    (default / "c.safetensors.123.tmp").write_bytes(b"x")  # an interrupted atomic write: never listed
    names = ["a.safetensors", "c.safetensors", str(Path("sub") / "b.safetensors")]
    assert files.checkpoint_names() == sorted(names)
    assert _options(AttnplugApply, "checkpoint") == sorted(names)
    assert _options(AttnplugDistill, "checkpoint") == [NEW_CHECKPOINT, *sorted(names)]
    # names are found in any folder; new files go to the first
    assert files.resolve_checkpoint("c", must_exist=True) == default / "c.safetensors"
    assert files.resolve_checkpoint("sub/b.safetensors", must_exist=True) == extra / "sub" / "b.safetensors"
    assert files.resolve_checkpoint("new_one", must_exist=False) == extra / "new_one.safetensors"
    assert files.resolve_checkpoint(str(default / "c.safetensors"), must_exist=True) == default / "c.safetensors"
    with pytest.raises(ValueError, match="no such file in the attnplug model folders"):
        files.resolve_checkpoint("missing", must_exist=True)
    with pytest.raises(ValueError, match="outside the attnplug model folders"):
        files.resolve_checkpoint(str(tmp_path / "elsewhere.safetensors"), must_exist=False)
    with pytest.raises(ValueError, match=r"'\.\.' is not allowed"):
        files.resolve_checkpoint("../escape", must_exist=False)
    with pytest.raises(ValueError, match="no file name given"):
        files.resolve_checkpoint("  ", must_exist=False)


def test_distill_accepts_a_new_file_name_and_apply_only_existing_files(comfy):
    from attnplug.hosts.comfy.nodes import NEW_CHECKPOINT, NO_CHECKPOINT, AttnplugApply, AttnplugDistill

    # ComfyUI skips its own dropdown check for inputs validate_inputs names: Distill takes any new name
    assert AttnplugDistill.validate_inputs(checkpoint=NEW_CHECKPOINT, new_checkpoint="fresh.safetensors") is True
    assert AttnplugDistill.validate_inputs(checkpoint="typed_in_an_api_prompt", new_checkpoint="") is True
    assert "no file name given" in AttnplugDistill.validate_inputs(checkpoint=NEW_CHECKPOINT, new_checkpoint=" ")
    assert "'..' is not allowed" in AttnplugDistill.validate_inputs(checkpoint="../x", new_checkpoint="")
    assert "no such file" in AttnplugApply.validate_inputs(checkpoint="never_trained.safetensors")
    assert AttnplugApply.validate_inputs(checkpoint=NO_CHECKPOINT) is True  # an exact-backend Apply needs none


def test_apply_node_without_a_checkpoint_says_to_train_one(comfy):
    _need_ttr()
    from attnplug.hosts.comfy.nodes import NO_CHECKPOINT, AttnplugApply

    with pytest.raises(ValueError, match="no checkpoint chosen.*Distill"):
        AttnplugApply.execute(model=stub.tiny_model(), checkpoint=NO_CHECKPOINT, quality_speed=1.0, config=None)
    with pytest.raises(ValueError, match="no such file"):
        AttnplugApply.execute(model=stub.tiny_model(), checkpoint="never_trained", quality_speed=1.0, config=None)


# ---- apply: the best ready layers ----------------------------------------------------------------------------

def test_choose_layers_best_k_by_ema_cosine(comfy):
    from attnplug.hosts.comfy.plans import choose_layers

    ready = ["single:0", "single:1", "single:2", "double:0"]
    scores = {"single:0": 0.10, "single:1": 0.02, "single:2": 0.05}
    assert choose_layers(ready, scores, 1.0) == ["single:1", "single:2", "single:0", "double:0"]
    assert choose_layers(ready, scores, 0.5) == ["single:1", "single:2"]
    assert choose_layers(ready, scores, 0.0) == []
    assert choose_layers(ready, scores, 0.3) == ["single:1", "single:2"]  # ceil(1.2) = 2
    with pytest.raises(ValueError):
        choose_layers(ready, scores, 1.5)


def test_apply_node_serves_best_ready_layers_from_checkpoint(comfy):
    _need_ttr()
    from attnplug.hosts.comfy.files import model_folders
    from attnplug.hosts.comfy.nodes import AttnplugApply

    path = model_folders()[0] / "apply_test.safetensors"
    stub.ttr_checkpoint(path, ready={"single:0", "single:1", "double:1"},
                        scores={"single:0": 0.08, "single:1": 0.03, "double:1": 0.05, "double:0": 0.01})
    base = stub.tiny_model()
    ref = stub.sample(base)

    def served(quality_speed):
        model = AttnplugApply.execute(model=base, checkpoint="apply_test.safetensors", quality_speed=quality_speed,
                                      config=stub.ttr_config())[0]
        out, seen = stub.sample_served(model)
        return out, {k for k, v in seen.items() if v.get("ttr")}

    out, layers = served(1.0)
    assert layers == {"single:0", "single:1", "double:1"}  # every ready layer, never the unready double:0
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    _, layers = served(0.5)
    assert layers == {"single:1", "double:1"}  # best 2 of 3 by EMA cosine distance
    out, layers = served(0.0)
    assert layers == set()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
