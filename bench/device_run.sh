#!/usr/bin/env bash
# One call on a lent GPU machine (docs/PERFORMANCE.md): install the carried wheels, make the repo
# importable as `attnplug`, run the GPU kernel tests, the tile sweep and the bench; logs go to $OUT.
# Usage (from the repo root, on the device): bash bench/device_run.sh [tests|tune|bench|flux|all]...
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
fi
mkdir -p /tmp/pkgs && ln -sfn "$PWD" /tmp/pkgs/attnplug && export PYTHONPATH=/tmp/pkgs:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
for step in "${@:-all}"; do
  case $step in
    tests|all) python3 -m pytest -q -p no:cacheprovider --import-mode=importlib tests/test_kernels_fused.py 2>&1 | tee "$OUT/tests.log" ;;&
    tune|all) python3 -m attnplug.bench.tune --sizes 1024,2048 --quick 2>&1 | tee "$OUT/tune.log" ;;&
    bench|all) python3 -m attnplug.bench.run --sizes 1024,2048,4096 --dtypes bf16 --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt" ;;&
    flux) python3 -m attnplug.bench.flux --json "$OUT/flux.json" 2>&1 | tee "$OUT/flux.txt" ;;&
  esac
done
