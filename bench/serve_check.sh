#!/usr/bin/env bash
# The served ttr call on one GPU (one call on a lent H200, about 8 minutes): the GPU tests of the serve path,
# `attnplug bench`'s product-path and bare-kernel rows (default layer, bf16, 1024² / 2048² / 4096²), bench-model
# (native and ttr on every single block; eager, a sync per call, one CUDA graph per forward at 1024² and 2048²; eager
# at 4096²), host µs per served call — this tree, and the older tree in $BEFORE (default .before) when it exists —
# then a short table (bench/serve_summary.py). Logs and JSON go to $OUT.
# Usage (repo root, on the device): bash bench/serve_check.sh [tests|bench|model|model4096|host|compile|precision|all]...
# (`all` = tests bench model model4096 host; `joint`: the joint layer's GPU tests, its product-path and bare-kernel rows on a double-block call and
# bench-model with ttr on every layer (`ttr-all`), about 4 minutes; `compile`: bench-model under torch.compile(mode="reduce-overhead") at
# 1024², minutes of compiling; `precision`: feature_precision's paired testbed measurement, bench/precision.py,
# PRECISION_ARGS replace its arguments, e.g. "--distill" for freshly distilled checkpoints)
# An older tree for the before rows: mkdir .before && git archive <commit> | tar -x -C .before --exclude=testbed/weights
set -o pipefail
source bench/device_env.sh
BEFORE=${BEFORE:-.before}
for step in "${@:-all}"; do
  case $step in
    tests|all) python3 -m pytest -q -p no:cacheprovider --import-mode=importlib tests/test_gpu_no_sync.py \
      tests/test_ttr_serve_plan.py tests/test_ttr_fused.py tests/test_kernels_fused.py tests/test_ttr_fused_window.py \
      tests/test_ttr_alpha_reference.py tests/test_ttr_fused_agreement.py tests/test_bench_model.py \
      tests/test_bench_variants.py 2>&1 | tee "$OUT/serve_tests.log" | tail -n 20 ;;&
    bench|all) python3 -m attnplug.bench.run --sizes 1024,2048,4096 --dtypes bf16 --configs default \
      --only session,fused --budget-ms 200 --json "$OUT/serve_bench.json" 2>"$OUT/serve_bench.err" \
      > "$OUT/serve_bench.txt"; tail -n 8 "$OUT/serve_bench.txt" ;;&
    model|all) python3 -m attnplug.bench.model --sizes 1024,2048 \
      --modes native,ttr-100,ttr-100/every-call,native/graph,ttr-100/graph --reps 3 --warmup 2 \
      --json "$OUT/serve_model.json" > "$OUT/serve_model.txt" 2>&1; tail -n 4 "$OUT/serve_model.txt" ;;&
    model4096|all) python3 -m attnplug.bench.model --sizes 4096 --modes native,ttr-100 --reps 2 --warmup 1 \
      --json "$OUT/serve_model4096.json" > "$OUT/serve_model4096.txt" 2>&1; tail -n 4 "$OUT/serve_model4096.txt" ;;&
    host|all) python3 -m attnplug.bench.host_overhead --sizes 1024,2048 --label after --json "$OUT/host_after.json"
      if [ -d "$BEFORE" ]; then  # the same script, importing the older tree as attnplug
        mkdir -p /tmp/before_pkgs && ln -sfn "$(cd "$BEFORE" && pwd)" /tmp/before_pkgs/attnplug
        (cd /tmp && PYTHONPATH=/tmp/before_pkgs:/tmp/site python3 "$OLDPWD/bench/host_overhead.py" --sizes 1024,2048 \
          --label before --json "$OUT/host_before.json")
      else echo "no $BEFORE: host µs per call of this tree only"; fi ;;&
    joint) python3 -m pytest -q -p no:cacheprovider --import-mode=importlib tests/test_ttr_joint_fused.py \
      tests/test_gpu_no_sync.py 2>&1 | tee "$OUT/joint_tests.log" | tail -n 20
      python3 -m attnplug.bench.run --sizes 1024,2048,4096 --dtypes bf16 --configs default,joint \
      --only session,fused --budget-ms 200 --json "$OUT/joint_bench.json" 2>"$OUT/joint_bench.err" > "$OUT/joint_bench.txt"
      tail -n 8 "$OUT/joint_bench.txt"
      python3 -m attnplug.bench.model --sizes 2048,4096 --modes native,ttr-100,ttr-all --reps 2 --warmup 2 \
        --json "$OUT/joint_model.json" > "$OUT/joint_model.txt" 2>&1; tail -n 6 "$OUT/joint_model.txt" ;;&
    compile) python3 -m attnplug.bench.model --sizes 1024 --modes native,native/compile,ttr-100,ttr-100/compile \
      --reps 3 --warmup 3 --json "$OUT/serve_model_compile.json" > "$OUT/serve_model_compile.txt" 2>&1
      tail -n 6 "$OUT/serve_model_compile.txt" ;;&
    precision) python3 -m attnplug.bench.precision --out "$OUT/precision" --device cuda ${PRECISION_ARGS:---seeds 0,1} \
      2>&1 | tee "$OUT/precision.log" | tail -n 12 ;;&
  esac
done
echo; python3 -m attnplug.bench.serve_summary "$OUT"
