"""The utility nodes against the stand-in, called directly and run in prompts by the stand-in executor (which
pairs lists by index as ComfyUI does): seeds, prompt files from ComfyUI's input folder, every prompt × seed
pair, sweeps clocked by a prompt list, typed (FLOAT / INT / STRING) outputs and their errors."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

_helpers_spec = importlib.util.spec_from_file_location("attnplug_comfy_stub_helpers",
                                                       Path(__file__).parent / "comfy_stub" / "helpers.py")
stub = importlib.util.module_from_spec(_helpers_spec)
_helpers_spec.loader.exec_module(stub)
comfy, _inference = stub.comfy, stub.inference  # fixtures: the stand-in per module, inference_mode per test


def _recorder():
    """A sink node that records what each of its executions got (a stand-in for a sampler's inputs)."""
    from comfy_api.latest import io

    class Recorder(io.ComfyNode):
        seen: list[tuple] = []

        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(node_id="Recorder", inputs=[
                io.String.Input("text", optional=True, tooltip="a prompt"),
                io.Int.Input("number", optional=True, tooltip="steps or a seed"),
                io.Float.Input("value", optional=True, tooltip="a cfg")], is_output_node=True)

        @classmethod
        def execute(cls, text=None, number=None, value=None):
            cls.seen.append(tuple(x for x in (text, number, value) if x is not None))
            return io.NodeOutput()

    Recorder.seen = []
    return Recorder


def _run(prompt):
    import execution

    from attnplug.hosts.comfy.nodes_utils import NODES

    recorder = _recorder()
    nodes = {n.GET_SCHEMA().node_id: n for n in NODES} | {"Recorder": recorder}
    outputs = execution.run_prompt(prompt, nodes)
    return recorder.seen, outputs


def _prompt_file(prompts, name="prompts.json"):
    import folder_paths

    path = Path(folder_paths.get_input_directory()) / name
    path.write_text(json.dumps(prompts))
    return path


# ---- seeds and prompt files -----------------------------------------------------------------------------------

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
    with pytest.raises(ValueError, match="cannot read .*missing.json"):
        LoadPromptListFromJSON.execute(json_path=str(tmp_path / "missing.json"))


def test_prompt_files_are_found_in_comfyuis_input_folder(comfy, tmp_path, monkeypatch):
    import folder_paths
    from attnplug.hosts.comfy.nodes_utils import LoadPromptListFromJSON

    _prompt_file(["from the input folder"])
    monkeypatch.chdir(tmp_path)  # a file of the same name in the working directory is not the one read
    Path("prompts.json").write_text(json.dumps(["from the working directory"]))
    assert LoadPromptListFromJSON.execute(json_path="prompts.json")[0] == ["from the input folder"]
    out = Path(folder_paths.get_output_directory())
    out.mkdir(parents=True, exist_ok=True)
    (out / "made.json").write_text(json.dumps(["from the output folder"]))
    assert LoadPromptListFromJSON.execute(json_path="made.json [output]")[0] == ["from the output folder"]
    with pytest.raises(ValueError, match="no file given; name a file in ComfyUI's input folder"):
        LoadPromptListFromJSON.execute(json_path=" ")
    with pytest.raises(ValueError, match="is a folder"):
        LoadPromptListFromJSON.execute(json_path=str(tmp_path))
    with pytest.raises(ValueError, match="relative names are looked up in ComfyUI's input folder"):
        LoadPromptListFromJSON.execute(json_path="typo.json")


def test_an_edited_prompt_file_changes_the_fingerprint(comfy):
    from attnplug.hosts.comfy.nodes_utils import LoadPromptListFromJSON

    path = _prompt_file(["one"], "edited.json")
    before = LoadPromptListFromJSON.fingerprint_inputs(json_path="edited.json")
    assert LoadPromptListFromJSON.fingerprint_inputs(json_path="edited.json") == before
    path.write_text(json.dumps(["one", "two"]))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    assert LoadPromptListFromJSON.fingerprint_inputs(json_path="edited.json") != before


# ---- prompts × seeds ---------------------------------------------------------------------------------------------

def test_comfyui_pairs_lists_by_index_and_prompt_seed_combinations_makes_every_pair(comfy):
    _prompt_file(["p1", "p2", "p3"])
    loaders = {"1": {"class_type": "AttnplugLoadPromptListFromJSON", "inputs": {"json_path": "prompts.json"}},
               "2": {"class_type": "AttnplugRandomSeedBatch", "inputs": {"seed": 0, "count": 2}}}
    seen, outputs = _run(loaders | {"9": {"class_type": "Recorder", "inputs": {"text": ["1", 0], "number": ["2", 0]}}})
    s1, s2 = outputs["2"][0]
    assert seen == [("p1", s1), ("p2", s2), ("p3", s2)]  # by index, the shorter list repeating its last item
    seen, _ = _run(loaders | {
        "3": {"class_type": "AttnplugPromptSeedCombinations", "inputs": {"prompts": ["1", 0], "seeds": ["2", 0]}},
        "9": {"class_type": "Recorder", "inputs": {"text": ["3", 0], "number": ["3", 1]}}})
    assert seen == [(p, s) for p in ("p1", "p2", "p3") for s in (s1, s2)]


def test_prompt_seed_combinations_from_widgets(comfy):
    from attnplug.hosts.comfy.nodes_utils import PromptSeedCombinations

    prompts, seeds = PromptSeedCombinations.execute(prompts=["a cat, sitting\n\na dog"], seeds=[7]).args
    assert list(zip(prompts, seeds)) == [("a cat, sitting", 7), ("a dog", 7)]  # one prompt per line, commas kept
    with pytest.raises(ValueError, match="prompts is empty"):
        PromptSeedCombinations.execute(prompts=[""], seeds=[1])
    with pytest.raises(ValueError, match="not a whole number"):
        PromptSeedCombinations.execute(prompts=["x"], seeds=[0.5])


# ---- sweeps --------------------------------------------------------------------------------------------------------

def test_clocked_sweep_values(comfy):
    from attnplug.hosts.comfy.nodes_utils import ClockedSweepValues

    floats, ints, strings = ClockedSweepValues.execute(clock=["7"], values=["1, 2, 3"]).args
    assert floats == [1, 1, 1, 2, 2, 3, 3] and ints == [1, 1, 1, 2, 2, 3, 3]
    assert all(type(x) is float for x in floats) and all(type(x) is int for x in ints)
    assert strings == ["1", "1", "1", "2", "2", "3", "3"]
    assert ClockedSweepValues.execute(clock=[""], values=["0.5 0.25"])[0] == [0.5, 0.25]
    assert ClockedSweepValues.execute(clock=[10, 20, 30, 40], values=["[1, 2]"])[0] == [1, 1, 2, 2]
    assert ClockedSweepValues.execute(clock=["[3, 1, 2]"], values=[4.0, 5.0, 6.0])[0] == [4.0, 5.0, 6.0]
    with pytest.raises(ValueError, match="do not fit a clock of 2 ticks"):
        ClockedSweepValues.execute(clock=["2"], values=["1 2 3"])
    with pytest.raises(ValueError, match="values is empty"):
        ClockedSweepValues.execute(clock=["3"], values=[""])


def test_clocked_sweep_runs_along_a_prompt_list_and_drives_steps(comfy):
    _prompt_file(["a cat", "a dog", "a cow"])
    seen, _ = _run({
        "1": {"class_type": "AttnplugLoadPromptListFromJSON", "inputs": {"json_path": "prompts.json"}},
        "2": {"class_type": "AttnplugClockedSweepValues", "inputs": {"clock": ["1", 0], "values": "20, 30"}},
        "9": {"class_type": "Recorder", "inputs": {"text": ["1", 0], "number": ["2", 1]}}})
    assert seen == [("a cat", 20), ("a dog", 20), ("a cow", 30)]  # steps are ints
    assert all(type(n) is int for _, n in seen)
    # a single connected prompt is one tick, however many words or digits it holds
    _prompt_file(["5 cats, 2 dogs"], "one.json")
    seen, _ = _run({
        "1": {"class_type": "AttnplugLoadPromptListFromJSON", "inputs": {"json_path": "one.json"}},
        "2": {"class_type": "AttnplugClockedSweepValues", "inputs": {"clock": ["1", 0], "values": "3.5"}},
        "9": {"class_type": "Recorder", "inputs": {"text": ["1", 0], "value": ["2", 0]}}})
    assert seen == [("5 cats, 2 dogs", 3.5)]


def test_typed_outputs_fail_only_when_their_output_is_connected(comfy):
    sweep = {"1": {"class_type": "AttnplugClockedSweepValues", "inputs": {"clock": "", "values": "a cat\na dog"}}}
    seen, outputs = _run(sweep | {"9": {"class_type": "Recorder", "inputs": {"text": ["1", 2]}}})
    assert seen == [("a cat",), ("a dog",)] and outputs["1"][0] == [] and outputs["1"][1] == []
    with pytest.raises(ValueError, match=r"output 'values_int' \(INT\): item 0 \('a cat'\) is not a whole number"):
        _run(sweep | {"9": {"class_type": "Recorder", "inputs": {"number": ["1", 1]}}})
    half = {"1": {"class_type": "AttnplugClockedSweepValues", "inputs": {"clock": "", "values": "0.5, 2"}}}
    with pytest.raises(ValueError, match=r"item 0 \(0\.5\) is not a whole number"):
        _run(half | {"9": {"class_type": "Recorder", "inputs": {"number": ["1", 1]}}})
    seen, _ = _run(half | {"9": {"class_type": "Recorder", "inputs": {"value": ["1", 0]}}})
    assert seen == [(0.5,), (2.0,)]


# ---- combinations ----------------------------------------------------------------------------------------------------

def _by_input(args):
    """Combinations' 12 outputs as {input: (floats, ints, strings)}."""
    return {x: tuple(args[3 * i: 3 * i + 3]) for i, x in enumerate("abcd")}


def test_combinations_full_cartesian_product(comfy):
    from attnplug.hosts.comfy.nodes_utils import Combinations

    out = _by_input(Combinations.execute(a=["1, 2"], b=["3 4"]).args)
    assert list(zip(out["a"][0], out["b"][0])) == [(1.0, 3.0), (1.0, 4.0), (2.0, 3.0), (2.0, 4.0)]
    assert out["a"][1] == [1, 1, 2, 2] and out["b"][2] == ["3", "4", "3", "4"]
    assert out["c"] == ([], [], []) and out["d"] == ([], [], [])
    out = _by_input(Combinations.execute(a=["[1, 2]"], b=[5.0, 6.0, 7.0], c=["0.5\n0.25"], d=["9"]).args)
    combos = set(zip(*(out[x][0] for x in "abcd")))
    assert len(out["a"][0]) == 12 and len(combos) == 12  # 2 x 3 x 2 x 1, non-coprime lengths included
    assert combos == {(x, y, z, 9.0) for x in (1.0, 2.0) for y in (5.0, 6.0, 7.0) for z in (0.5, 0.25)}
    out = _by_input(Combinations.execute(a=["1 2"], b=[""]).args)  # an empty optional widget is "not given"
    assert out["a"][0] == [1.0, 2.0] and out["b"][0] == []
    out = _by_input(Combinations.execute(a=["a cat, a dog"], b=["3.5 7"]).args)  # prompts × cfg
    assert list(zip(out["a"][2], out["b"][0])) == [("a cat", 3.5), ("a cat", 7.0), ("a dog", 3.5), ("a dog", 7.0)]
    with pytest.raises(ValueError, match="a is empty"):
        Combinations.execute(a=[""])


def test_combinations_errors_name_the_connected_output(comfy):
    combos = {"1": {"class_type": "AttnplugCombinations", "inputs": {"a": "1, 2", "b": ""}}}
    with pytest.raises(ValueError, match="output 'b_int' is connected, but input b is empty"):
        _run(combos | {"9": {"class_type": "Recorder", "inputs": {"number": ["1", 4]}}})
    words = {"1": {"class_type": "AttnplugCombinations", "inputs": {"a": "1, x"}}}
    with pytest.raises(ValueError, match=r"output 'a_float' \(FLOAT\): item 1 \('x'\) is not a number"):
        _run(words | {"9": {"class_type": "Recorder", "inputs": {"value": ["1", 0]}}})
    seen, _ = _run(words | {"9": {"class_type": "Recorder", "inputs": {"text": ["1", 2]}}})
    assert seen == [("1",), ("x",)]
