"""The command line: expected errors exit 2 with one line naming the problem (no traceback), before any work;
results are printed before they are written, so a finished run is never lost."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnplug.cli import app

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "testbed" / "configs" / "serve_single.toml"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line_error(res, command: str, *expected: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit)), \
        res.output
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"attnplug {command}: "), res.stderr
    for text in expected:
        assert text in res.stderr, res.stderr
    return res.stderr


@pytest.fixture
def no_work(monkeypatch):
    """Any evaluation or demo that starts is a test failure: errors must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the job started although its arguments were bad")

    monkeypatch.setattr("attnplug.testbed.evaluate.evaluate", forbidden)
    monkeypatch.setattr("attnplug.testbed.demo.run_demo", forbidden)


@pytest.mark.parametrize("args, expected", [
    (["--prompts", "0"], "--prompts 0: expected an integer >= 1"),
    (["--steps", "-3"], "--steps -3: expected an integer >= 1"),
    (["--seed", "-1"], "--seed -1: expected an integer in [0, 4294967295]"),
    (["--device", "tpu"], "--device 'tpu': expected 'cpu', 'cuda' or 'cuda:N'"),
])
def test_eval_refuses_bad_arguments_in_one_line(no_work, args, expected):
    _one_line_error(_run("eval", "--config", str(SERVE), *args), "eval", expected)


@no_cuda
@pytest.mark.parametrize("command", ["eval", "demo"])
def test_device_cuda_without_a_gpu_is_one_line(no_work, command):
    args = ["--config", str(SERVE)] if command == "eval" else ["--quick"]
    _one_line_error(_run(command, *args, "--device", "cuda"), command, "CUDA is not available here")


def test_eval_json_into_a_folder_fails_before_the_run(no_work, tmp_path):
    _one_line_error(_run("eval", "--config", str(SERVE), "--json", str(tmp_path)), "eval",
                    f"--json: {tmp_path} is a folder or not a regular file; give a file path")


def test_eval_bad_config_and_checkpoint_are_one_line_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr("attnplug.testbed.evaluate.load_testbed",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was loaded")))
    bad = tmp_path / "bad.toml"
    bad.write_text('backend = "hots"\n')
    _one_line_error(_run("eval", "--config", str(bad)), "eval", "invalid attnplug config", "unknown backend 'hots'")
    _one_line_error(_run("eval", "--config", str(SERVE), "--checkpoint", str(tmp_path)), "eval",
                    "is a folder, expected a checkpoint file")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    _one_line_error(_run("eval", "--config", str(SERVE), "--checkpoint", str(junk)), "eval",
                    "not a readable safetensors file")


def test_eval_prints_its_result_before_writing_it(tmp_path, monkeypatch):
    monkeypatch.setattr("attnplug.testbed.evaluate.evaluate", lambda *a, **k: {"adherence_exact": 1.0, "images": {}})
    out = tmp_path / "sub" / "eval.json"
    real_write = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self == out:
            raise OSError(28, "No space left on device", str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    res = _run("eval", "--config", str(SERVE), "--json", str(out))
    _one_line_error(res, "eval", "No space left on device")
    assert json.loads(res.stdout) == {"adherence_exact": 1.0}, "the finished evaluation is on stdout"


def test_demo_refuses_bad_arguments_in_one_line(no_work, tmp_path):
    _one_line_error(_run("demo", "--quick", "--runs", "0"), "demo", "--runs 0: expected an integer >= 1")
    _one_line_error(_run("demo", "--quick", "--resume", str(tmp_path / "none.safetensors")), "demo",
                    "--resume", "no checkpoint file there")


def test_demo_bad_config_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("attnplug.testbed.demo.load_testbed",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was loaded")))
    bad = tmp_path / "demo.toml"
    bad.write_bytes("training = true\n".encode("utf-16"))
    _one_line_error(_run("demo", "--quick", "--config", str(bad), "--out", str(tmp_path / "out")), "demo",
                    "not UTF-8 text", "UTF-16")


def test_bench_json_into_a_folder_fails_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr("attnplug.bench.run.run_bench",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the bench ran")))
    _one_line_error(_run("bench", "--smoke", "--json", str(tmp_path)), "bench", "--json", "is a folder")
    if not torch.cuda.is_available():
        _one_line_error(_run("bench", "--smoke", "--device", "cuda"), "bench", "CUDA is not available here")
