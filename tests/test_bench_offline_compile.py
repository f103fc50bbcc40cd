"""`bench.offline_compile`: the key- and query-pass launches a serve plan makes are recorded on the CPU (nothing runs),
and each compiles for sm_90 with the installed Triton into a register and stack count. Skipped without Triton or its
bundled cuobjdump."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from attnplug.bench import default_layer, offline_compile
from attnplug.plugins.ttr.kernels import KernelConfig, launchers


def _tools_or_skip() -> None:
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this Triton has no bundled cuobjdump")


def test_the_joint_layer_records_its_joint_pass_with_the_configured_tiles():
    saved = (launchers._kernels, default_layer.fused_unsupported_reasons)
    launches = offline_compile.layer_launches("512", "joint", KernelConfig(joint_block_m=32, joint_warps=4))
    assert (launchers._kernels, default_layer.fused_unsupported_reasons) == saved  # the recorder is undone
    assert [name for name, _, _ in launches] == ["_kv_state_kernel", "_query_kernel"]
    assert launches[0][2]["STORE_PK"] == 1  # the joint plan's key pass writes φ(k)
    assert [(c["MODE"], c["BM"], c["num_warps"]) for _, _, c in launches[1:]] == [(5, 32, 4)]


def test_the_command_compiles_the_joint_pass_for_sm90_and_prints_its_registers_and_stack():
    _tools_or_skip()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted kernels
    out = subprocess.run([sys.executable, "-m", "attnplug.bench.offline_compile", "--sizes", "512", "--layers",
                          "joint", "--config", '{"joint_block_m": 32, "joint_warps": 4}'],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = re.search(r"512 joint .* MODE=5 BM=32 warps=4 .*: (\d+) registers, (\d+) B stack", out.stdout)
    assert line, out.stdout
    assert 0 < int(line.group(1)) <= 255
    assert re.search(r"512 joint .* key pass BN=\d+ .*STORE_PK=1 STORE_LM=0: \d+ registers", out.stdout), out.stdout


def test_the_hybrid_layer_records_its_one_pass_landmark_launch():
    launches = offline_compile.layer_launches("512", "hybrid", KernelConfig(lm_block_m=64))
    assert [(c["MODE"], c["BM"]) for name, _, c in launches if name == "_query_kernel"] == [(4, 64)]
    # with the image landmarks' rows written by the key pass (lm_direct = 2), that pass is built to write them
    stores = offline_compile.layer_launches("512", "hybrid", KernelConfig(lm_direct=2))
    assert [c["STORE_LM"] for name, _, c in stores if name == "_kv_state_kernel"] == [1]


def test_bad_arguments_are_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        offline_compile.main(["--layers", "both"])
    assert "--layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        offline_compile.main(["--config", '{"no_such_field": 1}'])
    assert "--config" in capsys.readouterr().err
