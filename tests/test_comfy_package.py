"""What ComfyUI users install and load: the example workflows (UI format for the canvas, API format for
`/prompt`) match the nodes' schemas and describe the same graph; requirements.txt (ComfyUI Manager) matches
pyproject's dependencies; pyproject has the registry's [tool.comfy] section."""
from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference  # fixtures: the stand-in per module, inference_mode per test

ROOT = Path(__file__).resolve().parent.parent
WIDGET_TYPES = {"BOOLEAN", "INT", "FLOAT", "STRING", "COMBO"}
CONTROL = object()  # the frontend's "control after generate" value that follows a seed widget
# widgets of the ComfyUI core nodes the example uses, in their order (facts of ComfyUI's nodes.py)
CORE_WIDGETS = {
    "UNETLoader": ["unet_name", "weight_dtype"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "VAELoader": ["vae_name"],
    "CLIPTextEncode": ["text"],
    "FluxGuidance": ["guidance"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "SaveImage": ["filename_prefix"],
}


def _schemas():
    return {n.GET_SCHEMA().node_id: n.GET_SCHEMA() for n in stub.all_nodes()}


def _is_widget(i) -> bool:
    return i.io_type in WIDGET_TYPES or getattr(i, "input_override", None) is not None


def _widget_names(schema) -> list:
    """The widgets of a node in the order the frontend saves their values (a seed-like INT adds its control)."""
    names = []
    for i in schema.inputs:
        if _is_widget(i):
            names.append(i.id)
            control = getattr(i, "control_after_generate", None)
            if i.io_type == "INT" and (control if control is not None else i.id in ("seed", "noise_seed")):
                names.append(CONTROL)
    return names


def _load(name):
    return json.loads((ROOT / "examples" / name).read_text())


def test_api_workflow_uses_attnplug_nodes_as_declared(comfy):
    """examples/comfy_workflow_api.json: every attnplug node exists and gets exactly its inputs, valid values."""
    schemas = _schemas()
    workflow = _load("comfy_workflow_api.json")
    used = [n for n in workflow.values() if n["class_type"].startswith("Attnplug")]
    assert {n["class_type"] for n in used} >= {"AttnplugConfig", "AttnplugSchedule", "AttnplugDistill",
                                                "AttnplugPromptSeedCombinations"}
    nodes = {n.GET_SCHEMA().node_id: n for n in stub.all_nodes()}
    for node in used:
        schema = schemas[node["class_type"]]
        declared = {i.id for i in schema.inputs}
        required = {i.id for i in schema.inputs if not i.optional}
        assert required <= set(node["inputs"]) <= declared, node["class_type"]
        for i in schema.inputs:
            value = node["inputs"].get(i.id)
            if hasattr(i, "options") and isinstance(value, str):
                assert value in i.options, (node["class_type"], i.id, value)
        cls = nodes[node["class_type"]]
        if "validate_inputs" in vars(cls):  # ComfyUI calls it with the widget values its signature names
            names = inspect.signature(cls.validate_inputs).parameters
            assert cls.validate_inputs(**{k: node["inputs"][k] for k in names}) is True


def test_ui_workflow_loads_onto_the_canvas_as_the_schemas_say(comfy):
    """examples/comfy_workflow.json (UI format): links join existing sockets of the same type; attnplug nodes have
    their schema's sockets, outputs and one saved value per widget."""
    schemas = _schemas()
    ui = _load("comfy_workflow.json")
    assert ui["version"] == 0.4 and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, origin, slot, target, target_slot, typ in ui["links"]:
        out, inp = nodes[origin]["outputs"][slot], nodes[target]["inputs"][target_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == typ and (inp["type"] == typ or typ in inp["type"].split(",")), (link_id, out, inp)
    for node in ui["nodes"]:
        assert node["properties"]["Node name for S&R"] == node["type"]
        schema = schemas.get(node["type"])
        if schema is None:
            assert len(node["widgets_values"]) == len(CORE_WIDGETS[node["type"]]), node["type"]
            continue
        sockets = {i.id: i.io_type for i in schema.inputs}
        for inp in node["inputs"]:
            assert sockets[inp["name"]] == inp["type"] or "widget" in inp, (node["type"], inp)
        assert [(o["name"], o["type"]) for o in node["outputs"]] == [(o.display_name, o.io_type)
                                                                     for o in schema.outputs]
        assert all(o.get("shape") == 6 for o, so in zip(node["outputs"], schema.outputs) if so.is_output_list)
        assert len(node["widgets_values"]) == len(_widget_names(schema)), node["type"]


def test_both_workflows_describe_the_same_graph(comfy):
    schemas = _schemas()
    api = _load("comfy_workflow_api.json")
    ui = _load("comfy_workflow.json")
    links = {link[0]: link for link in ui["links"]}
    assert sorted(api, key=int) == [str(n["id"]) for n in sorted(ui["nodes"], key=lambda n: n["id"])]
    for node in ui["nodes"]:
        expected = api[str(node["id"])]
        assert node["type"] == expected["class_type"] and node["title"] == expected["_meta"]["title"]
        names = _widget_names(schemas[node["type"]]) if node["type"] in schemas else CORE_WIDGETS[node["type"]]
        inputs = {name: value for name, value in zip(names, node["widgets_values"]) if name is not CONTROL}
        for inp in node["inputs"]:
            if inp["link"] is not None:
                _, origin, slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(origin), slot]
        assert inputs == expected["inputs"], node["type"]


def test_requirements_txt_lists_the_runtime_dependencies(comfy):
    """ComfyUI Manager installs requirements.txt: pyproject's dependencies, except torch (ComfyUI brings it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert requirements == [d for d in project["dependencies"] if not d.startswith("torch")]


def test_pyproject_has_the_comfy_registry_section(comfy):
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert set(tool) == {"PublisherId", "DisplayName", "Icon", "includes"}
    assert tool["PublisherId"] and tool["DisplayName"] == "attnplug" and tool["includes"] == []
