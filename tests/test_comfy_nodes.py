"""ComfyUI nodes against the stand-in: schemas (tooltips, categories), config, schedule routing, utility
nodes (Combinations on [1,2]x[3,4] included), training during sampling and apply from checkpoint."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference  # fixtures: the stand-in per module, inference_mode per test


# ---- schemas -----------------------------------------------------------------------------------------

def test_every_node_has_a_valid_schema_with_tooltips(comfy):
    from comfy_api.latest import io

    for node in stub.all_nodes():
        assert issubclass(node, io.ComfyNode)
        schema = node.GET_SCHEMA()  # validates unique ids, tooltips on every input, combo defaults
        assert schema.category.startswith("attnplug/"), schema.node_id
        assert schema.inputs and all(i.tooltip for i in schema.inputs)
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
    from attnplug.hosts.comfy.nodes import AttnplugConfig

    out = AttnplugConfig.execute(config_path="", backend="sdpa", exact="sdpa", strict=True, seed=3,
                                 extra_toml='[[gates]]\nkind = "sigma_window"\nmax = 0.5\n')
    cfg = out[0]
    assert cfg["backend"] == "sdpa" and cfg["exact"] == "sdpa" and cfg["strict"] is True and cfg["seed"] == 3
    assert cfg["gates"] == [{"kind": "sigma_window", "max": 0.5}]


def test_config_node_loads_a_file_and_reports_bad_fields(comfy, tmp_path):
    from attnplug.core import ConfigError
    from attnplug.hosts.comfy.nodes import AttnplugConfig

    good = tmp_path / "c.toml"
    good.write_text('backend = "sdpa"\nexact = "sdpa"\nseed = 9\n')
    cfg = AttnplugConfig.execute(config_path=str(good), backend="host", exact="host", strict=False, seed=0)[0]
    assert cfg["seed"] == 9 and cfg["backend"] == "sdpa"  # the file wins over the widgets
    bad = tmp_path / "bad.toml"
    bad.write_text('backend = "sdpa"\nbakend = "x"\n')
    with pytest.raises(ConfigError, match="bakend"):
        AttnplugConfig.execute(config_path=str(bad), backend="host", exact="host", strict=False, seed=0)
    with pytest.raises(ConfigError, match="unknown backend"):
        AttnplugConfig.execute(config_path="", backend="nope", exact="host", strict=False, seed=0)


# ---- schedule node: routing through a sampling run ----------------------------------------------------------

def test_schedule_node_routes_steps_and_layers(comfy):
    """Exact (host kernel) on the first and last step; sdpa on single blocks in between; exact elsewhere."""
    import comfy.ldm.modules.attention as attn
    from attnplug.hosts.comfy.nodes import AttnplugApply, AttnplugConfig, AttnplugSchedule

    cfg = AttnplugConfig.execute(config_path="", backend="sdpa", exact="host", strict=False, seed=0,
                                 extra_toml="loggers = []")[0]
    sched = AttnplugSchedule.execute(config=cfg, exact_first_steps=1, exact_last_steps=1, backend="sdpa", steps="",
                                     layers="single:*", otherwise="exact")[0]
    assert "gates" not in cfg  # the input config is not mutated (ComfyUI caches node outputs)
    model = AttnplugApply.execute(model=stub.tiny_model(), checkpoint="", quality_speed=1.0, config=sched)[0]

    per_step: list[int] = []
    orig = attn.attention_pytorch.__wrapped__

    from attnplug.hosts.comfy import current_binding

    binding = current_binding(model)
    served: list[dict] = []
    orig_finish = binding.handle.finish

    def finish():
        served.append({k: dict(s.served) for k, s in binding.handle.session.stats.items()})
        return orig_finish()

    binding.handle.finish = finish
    attn.KERNEL_CALLS.clear()
    stub.sample(model, steps=5)
    calls = attn.KERNEL_CALLS
    # 4 layers per step: host kernel for all 4 on steps 0 and 4, only the 2 double blocks on steps 1-3
    assert len(calls) == 4 + 3 * 2 + 4
    stats = served[0]
    assert stats["single:0"] == {"host": 2, "sdpa": 3} and stats["single:1"] == {"host": 2, "sdpa": 3}
    assert stats["double:0"] == {"host": 5} and stats["double:1"] == {"host": 5}
    del orig, per_step


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


# ---- utility nodes ------------------------------------------------------------------------------------------

def test_combinations_full_cartesian_product(comfy):
    from attnplug.hosts.comfy.nodes_utils import Combinations

    a, b, c, d = Combinations.execute(a=["1, 2"], b=["3 4"]).args
    assert list(zip(a, b)) == [(1.0, 3.0), (1.0, 4.0), (2.0, 3.0), (2.0, 4.0)]
    assert len(set(zip(a, b))) == 4 and c == [] and d == []
    a, b, c, d = Combinations.execute(a=["[1, 2]"], b=[5.0, 6.0, 7.0], c=["0.5\n0.25"], d=["9"]).args
    combos = set(zip(a, b, c, d))
    assert len(a) == 12 and len(combos) == 12  # 2 x 3 x 2 x 1, non-coprime lengths included
    assert combos == {(x, y, z, 9.0) for x in (1.0, 2.0) for y in (5.0, 6.0, 7.0) for z in (0.5, 0.25)}
    a, b, _, _ = Combinations.execute(a=["1 2"], b=[""]).args  # an empty optional widget is "not given"
    assert a == [1.0, 2.0] and b == []
    with pytest.raises(ValueError, match="a is empty"):
        Combinations.execute(a=[""])
    with pytest.raises(ValueError, match="not a number"):
        Combinations.execute(a=["1, x"])


def test_clocked_sweep_values(comfy):
    from attnplug.hosts.comfy.nodes_utils import ClockedSweepValues

    assert ClockedSweepValues.execute(clock=["7"], values=["1, 2, 3"])[0] == [1, 1, 1, 2, 2, 3, 3]
    assert ClockedSweepValues.execute(clock=[""], values=["0.5 0.25"])[0] == [0.5, 0.25]
    assert ClockedSweepValues.execute(clock=[10, 20, 30, 40], values=["[1, 2]"])[0] == [1, 1, 2, 2]
    assert ClockedSweepValues.execute(clock=["[3, 1, 2]"], values=[4.0, 5.0, 6.0])[0] == [4.0, 5.0, 6.0]
    with pytest.raises(ValueError, match="do not fit"):
        ClockedSweepValues.execute(clock=["2"], values=["1 2 3"])
    with pytest.raises(ValueError, match="values is empty"):
        ClockedSweepValues.execute(clock=["3"], values=[""])


def test_random_seed_batch(comfy):
    from attnplug.hosts.comfy.nodes_utils import RandomSeedBatch

    s = RandomSeedBatch.execute(seed=42, count=16)[0]
    assert len(s) == 16 and len(set(s)) == 16 and all(0 <= x < 2 ** 64 for x in s)
    assert s == RandomSeedBatch.execute(seed=42, count=16)[0]  # deterministic
    assert s[:4] == RandomSeedBatch.execute(seed=42, count=4)[0]  # a prefix of a longer batch
    assert s != RandomSeedBatch.execute(seed=43, count=16)[0]
    with pytest.raises(ValueError, match="count"):
        RandomSeedBatch.execute(seed=0, count=0)


def test_load_prompt_list_is_strict(comfy, tmp_path):
    from attnplug.hosts.comfy.nodes_utils import LoadPromptListFromJSON

    good = tmp_path / "p.json"
    good.write_text(json.dumps(["a cat", "a dog"]))
    assert LoadPromptListFromJSON.execute(json_path=str(good))[0] == ["a cat", "a dog"]
    for content, match in ((json.dumps({"p": "x"}), "array of strings"),
                           (json.dumps(["ok", 3]), r"\[1\] must be a string"),
                           ("[1,", "not valid JSON"), ("[]", "empty array")):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(ValueError, match=match):
            LoadPromptListFromJSON.execute(json_path=str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        LoadPromptListFromJSON.execute(json_path=str(tmp_path / "missing.json"))


# ---- checkpoint paths --------------------------------------------------------------------------------------

def test_checkpoint_paths_default_under_models_attnplug(comfy, tmp_path):
    import asyncio

    import folder_paths
    from attnplug.hosts.comfy.configs import resolve_checkpoint
    from attnplug.hosts.comfy.extension import comfy_entrypoint

    p = resolve_checkpoint("flux_ttr", must_exist=False)
    assert p == Path(folder_paths.models_dir) / "attnplug" / "flux_ttr.safetensors" and p.parent.is_dir()
    asyncio.run(comfy_entrypoint().on_load())
    assert folder_paths.get_folder_paths("attnplug")[0] == str(p.parent)
    absolute = tmp_path / "x" / "ck.safetensors"
    assert resolve_checkpoint(str(absolute), must_exist=False) == absolute and absolute.parent.is_dir()
    with pytest.raises(ValueError, match="no such file"):
        resolve_checkpoint("missing.safetensors", must_exist=True)


def test_apply_node_refuses_missing_checkpoint_for_learned_backend(comfy):
    from attnplug.hosts.comfy.configs import learned_backends
    from attnplug.hosts.comfy.nodes import AttnplugApply

    if "ttr" not in learned_backends():
        pytest.skip("ttr backend not registered")
    with pytest.raises(ValueError, match="no such file"):
        AttnplugApply.execute(model=stub.tiny_model(), checkpoint="never_trained", quality_speed=1.0, config=None)


def test_choose_layers_best_k_by_ema_cosine(comfy):
    from attnplug.hosts.comfy.configs import choose_layers

    ready = ["single:0", "single:1", "single:2", "double:0"]
    scores = {"single:0": 0.10, "single:1": 0.02, "single:2": 0.05}
    assert choose_layers(ready, scores, 1.0) == ["single:1", "single:2", "single:0", "double:0"]
    assert choose_layers(ready, scores, 0.5) == ["single:1", "single:2"]
    assert choose_layers(ready, scores, 0.0) == []
    assert choose_layers(ready, scores, 0.3) == ["single:1", "single:2"]  # ceil(1.2) = 2
    with pytest.raises(ValueError):
        choose_layers(ready, scores, 1.5)


def _ttr_checkpoint(path, ready, scores=None):
    """A ttr checkpoint for the stand-in Flux (2 heads x 16) with the given layers marked ready."""
    from attnplug.core import LayerSpec, Session, save_checkpoint

    s = Session({"backend": "ttr", "exact": "host", "loggers": [], "plugins": {"ttr": stub.TINY_TTR}})
    backend = s.learned_backends()["ttr"]
    for key in ("double:0", "double:1", "single:0", "single:1"):
        backend.layer(LayerSpec(key, 2, 16))
        backend.ready[key] = key in ready
    comps = {"backend.ttr": backend.state()}
    if scores is not None:  # what a distiller exposes: per-layer EMA cosine distance
        comps["distiller.test"] = ({}, {"layers": {k: {"ema_cos": v, "ready": k in ready} for k, v in scores.items()}})
    save_checkpoint(path, comps)
    s.close()


def test_apply_node_serves_best_ready_layers_from_checkpoint(comfy):
    from attnplug.hosts.comfy.configs import learned_backends, models_folder
    from attnplug.hosts.comfy.nodes import AttnplugApply

    if "ttr" not in learned_backends():
        pytest.skip("ttr backend not registered")
    path = models_folder() / "apply_test.safetensors"
    _ttr_checkpoint(path, ready={"single:0", "single:1", "double:1"},
                    scores={"single:0": 0.08, "single:1": 0.03, "double:1": 0.05, "double:0": 0.01})
    base = stub.tiny_model()
    ref = stub.sample(base)
    cfg = {"backend": "ttr", "exact": "host", "loggers": [], "plugins": {"ttr": stub.TINY_TTR}}

    def served(quality_speed):
        model = AttnplugApply.execute(model=base, checkpoint="apply_test", quality_speed=quality_speed, config=cfg)[0]
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


def test_example_workflow_uses_attnplug_nodes_as_declared(comfy):
    """examples/comfy_workflow.json (API format): every attnplug node exists and gets exactly its inputs."""
    import attnplug

    path = Path(attnplug.__file__).parent / "examples" / "comfy_workflow.json"
    workflow = json.loads(path.read_text())
    schemas = {n.GET_SCHEMA().node_id: n.GET_SCHEMA() for n in stub.all_nodes()}
    used = [n for n in workflow.values() if n["class_type"].startswith("Attnplug")]
    assert {n["class_type"] for n in used} >= {"AttnplugConfig", "AttnplugSchedule", "AttnplugDistill"}
    for node in used:
        schema = schemas[node["class_type"]]
        declared = {i.id for i in schema.inputs}
        required = {i.id for i in schema.inputs if not i.optional}
        assert required <= set(node["inputs"]) <= declared, node["class_type"]
        for i in schema.inputs:
            value = node["inputs"].get(i.id)
            if hasattr(i, "options") and isinstance(value, str) and i.id != "distiller":
                assert value in i.options, (node["class_type"], i.id, value)
