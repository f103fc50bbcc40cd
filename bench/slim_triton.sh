#!/usr/bin/env bash
# A Triton wheel cut down to what the ttr kernels use on Hopper, small enough to carry to a lent GPU machine
# (a device call carries at most 64 MiB of ignored files; the Triton 3.9 wheel is 272 MiB).
# Usage (here, not on the device): bash bench/slim_triton.sh WHEEL OUT.tar.xz
#   e.g. pip download triton==3.9.0 --python-version 3.12 --platform manylinux_2_27_x86_64 --only-binary=:all: \
#          --no-deps -d /tmp/tw && bash bench/slim_triton.sh /tmp/tw/triton-3.9.0-*.whl .triton_overlay/triton.tar.xz
# Kept: the Python package, libtriton (debug sections stripped: 477 -> 183 MiB), the CUDA headers the launcher
# compiles against, libdevice, the ptxas Triton runs for sm_90 and newer (`ptxas-blackwell` in 3.9), nvdisasm and
# cuobjdump. Dropped: the AMD backend, the ptxas for GPUs before sm_90, CUPTI and the static libraries (profiling
# only), the instrumentation test library. bench/device_env.sh unpacks it when TRITON_OVERLAY names the file.
set -euo pipefail
wheel=$1; out=$2
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m zipfile -e "$wheel" "$work"
t=$work/triton
rm -rf "$t/backends/amd" "$t/backends/nvidia/lib/cupti" "$t/backends/nvidia/lib/cupti-blackwell"
[ -f "$t/backends/nvidia/bin/ptxas-blackwell" ] && rm -f "$t/backends/nvidia/bin/ptxas"  # sm_90+ runs the other
find "$work" -name '*.a' -delete
rm -f "$t"/instrumentation/libGPUInstrumentationTestLib.so
find "$t" -name '*.so*' -type f -exec strip --strip-unneeded {} \;
mkdir -p "$(dirname "$out")"
(cd "$work" && tar -cf - triton triton-*.dist-info) | xz -T0 -9e > "$out"
ls -l "$out"
