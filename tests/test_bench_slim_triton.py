"""bench/slim_triton.sh: a Triton wheel cut down for a lent Hopper machine keeps what the kernels need and drops the
rest (what a GPU run relies on: the package imports from the unpacked folder, with the ptxas Triton runs for sm_90)."""
from __future__ import annotations

import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "slim_triton.sh"
KEPT = ["triton/__init__.py", "triton/_C/libtriton.so", "triton/backends/nvidia/bin/ptxas-blackwell",
        "triton/backends/nvidia/bin/nvdisasm", "triton/backends/nvidia/include/cuda.h",
        "triton/backends/nvidia/lib/libdevice.10.bc", "triton-3.9.0.dist-info/METADATA"]
DROPPED = ["triton/backends/amd/lib/libtriton_amd_codegen.so", "triton/backends/nvidia/bin/ptxas",
           "triton/backends/nvidia/lib/cupti/libcupti.so", "triton/backends/nvidia/lib/cupti-blackwell/libcupti.so",
           "triton/backends/nvidia/lib/cupti/libcupti_static.a", "triton/instrumentation/libGPUInstrumentationTestLib.so"]


@pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "strip", "xz", "tar")), reason="needs bash, strip, xz")
def test_slim_wheel_keeps_the_hopper_toolchain_and_drops_the_rest(tmp_path):
    wheel = tmp_path / "triton-3.9.0-cp312-abi3-manylinux_2_27_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in KEPT + DROPPED:
            z.writestr(name, "not a real binary\n")  # strip refuses these: the script must go on
    out = tmp_path / "overlay" / "triton.tar.xz"
    subprocess.run(["bash", str(SCRIPT), str(wheel), str(out)], check=True, capture_output=True)
    with tarfile.open(out) as t:
        names = set(t.getnames())
    assert set(KEPT) <= names
    assert not set(DROPPED) & names
