#!/usr/bin/env bash
# One call on a lent GPU machine (docs/PERFORMANCE.md): install the carried wheels, make the repo
# importable as `attnplug`, run the GPU kernel tests, the tile sweep and the bench; logs go to $OUT.
# Usage (from the repo root, on the device): bash bench/device_run.sh [tests|tune|profile|bench|model|quality|all]...
# (`all` = tests, tune, profile, bench, model: about 9 minutes on an H200; TUNE_ARGS, PROFILE_ARGS, BENCH_ARGS, MODEL_ARGS
# replace each step's default arguments)
# `quality` starts one testbed.quality process per variant (CPU-bound Python: they share the GPU; layers to
# train in QUALITY_LAYERS, servings in QUALITY_SERVING, seeds in QUALITY_SEEDS = "0 1" or QUALITY_SEED), plus `attnplug eval` of each config in QUALITY_EVALS on the committed
# checkpoint, waits up to QUALITY_WAIT_S, then merges what finished. Everything must end inside the
# call: the lent machine is given back ~30 s after a call returns, background processes with it.
# QUALITY_DIR (/tmp/quality), QUALITY_DEVICE (cuda), QUALITY_PLAN (extra testbed.quality arguments, e.g. "--runs 1 --steps 4" for a smoke run) and
# QUALITY_EVAL_WORKERS (processes that evaluate one checkpoint's servings side by side, 1) apply to both.
# QUALITY_PHASE=distill | evaluate splits the sweep over two calls (testbed.quality --phase): the distill call leaves
# $OUT/checkpoints.tgz; unpack it into an ignored folder of the repo, carry it, and set QUALITY_FROM to it (with the
# same QUALITY_VARIANTS and QUALITY_SEEDS) in the evaluate call. QUALITY_DISTILL_S stops each distillation after that
# many seconds and saves it (testbed.quality --distill-budget-s), so a distill call always leaves its checkpoints.
# `joint` is `quality` with the joint-layer sweep's defaults: every layer distilled online, the hybrid layer everywhere
# vs the joint layer on the double blocks (both combinations), seeds 0 and 1, each variant's own servings (the per-layer
# effect table for "hybrid everywhere" and "joint shared"), 3 evaluation workers per process; it also writes
# effects.md and copies the best joint variant's checkpoint and serving config to $OUT (ttr_all_layers.safetensors,
# serve_all_layers.toml). About 7 minutes on one H200 (docs/QUALITY.md, "The joint layer").
# The large testbeds (docs/QUALITY.md, "Large testbeds"; each step planned to end inside one call):
# `bigbed-train` trains BIGBED (grid64 | grid128) with its registry recipe (7 minutes of training, then the saved
#   file's evaluation) into $OUT/BIGBED: commit its files to testbed/weights/BIGBED/ (grid128 starts from grid64
#   when that is committed); BIGBED_TRAIN_ARGS adds arguments.
# `bigbed-sweep` is `quality` on QUALITY_TESTBED (default BIGBED, else grid128) with the front's variants (testbed/quality.py
#   LARGE_VARIANTS; QUALITY_VARIANTS picks a subset: four per call at 16 384 tokens), the single blocks, both α
#   references, seed QUALITY_SEEDS (0), the plan QUALITY_PLAN (grid128: 40 runs x 4 prompts, 16 held-out prompts).
# `transfer` distils the product default on each of TRANSFER_FROM ("default grid64", one process each) and serves
#   every checkpoint on TRANSFER_TESTBEDS (default,grid64) with both α references ($OUT/transfer.md).
# `stepcache` evaluates First Block Cache (thresholds STEPCACHE_THRESHOLDS) with exact attention and with ttr on
#   STEPCACHE_TESTBEDS ($OUT/stepcache.md); the ttr rows serve STEPCACHE_CKPT_<testbed> with
#   STEPCACHE_CONFIG_<testbed> (default testbed: the committed window checkpoint). `stepcache-bench` times a
#   skipped step on the FLUX.1-dev-shaped model (bench-model /fbcache) beside the full forwards.
# `tests` runs the GPU tests in TEST_WORKERS (8) processes where pytest-xdist is installed (a wheel among the carried
#   ones): most of their time is Triton compiling one kernel variant after another.
# `triton-overlay` (with TRITON_OVERLAY, bench/device_env.sh): the product-path bench (OVERLAY_BENCH_ARGS) under the
#   installed Triton and under the overlay, one after the other ($OUT/bench_triton_{installed,overlay}.{txt,json}; its
#   `fused tma-lm` rows time the TMA-fed landmark softmax, warp-specialised under the overlay, Triton ≥ 3.9), then the
#   fused kernels' GPU tests under the overlay (OVERLAY_TESTS=0 skips them; OVERLAY_WHICH=overlay times only it).
# `bigbed-bench` times the served call (`session ttr-<config>`) of every point of the front at 1024² and 2048².
set -o pipefail
source bench/device_env.sh
wait_pids() {  # wait_pids PIDFILE SECONDS: until every process in PIDFILE ended or SECONDS passed
  local end=$((SECONDS + $2)) alive p
  while [ $SECONDS -lt $end ]; do alive=0; for p in $(cat $1); do kill -0 $p 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0; sleep 10; done
}
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-8}")  # GPU tests: Triton compiles in parallel
for step in "${@:-all}"; do
  case $step in
    tests|all)
      python3 -m pytest -q -p no:cacheprovider --import-mode=importlib $XDIST --durations=8 tests/test_kernels_fused.py \
      tests/test_ttr_fused.py tests/test_ttr_fused_agreement.py tests/test_ttr_compile.py tests/test_distill_train.py \
      tests/test_distill_ttr.py tests/test_diffusers_compile.py tests/test_gpu_no_sync.py tests/test_ttr_fused_window.py tests/test_ttr_alpha_reference.py tests/test_bench_model.py tests/test_bench_variants.py \
      tests/test_exact_fp8.py tests/test_kernels_tma_landmarks.py \
      2>&1 | tee "$OUT/tests.log" ;;&
    triton-overlay)
      [ -n "${OVERLAY_DIR:-}" ] || { echo "triton-overlay: set TRITON_OVERLAY to a bench/slim_triton.sh file"; exit 1; }
      # fusion on, as Triton 3.6 compiles by default (3.9 warns that its default will change)
      OV="env PYTHONPATH=$OVERLAY_DIR:$PYTHONPATH TRITON_CACHE_DIR=/tmp/triton_cache_overlay TRITON_DEFAULT_FP_FUSION=1 TRITON_BACKENDS_IN_TREE=1"
      $OV python3 -c "import triton; print('overlay triton', triton.__version__, triton.__file__)" | tee -a "$OUT/gpu.txt"
      BA=${OVERLAY_BENCH_ARGS:---sizes 1024,2048,4096 --dtypes bf16 --configs default,joint --only session,fused --no-graphs}
      for which in ${OVERLAY_WHICH:-installed overlay}; do
        R=""; [ $which = overlay ] && R=$OV
        $R python3 -m attnplug.bench.run $BA --json "$OUT/bench_triton_$which.json" 2>"$OUT/bench_triton_$which.err" \
          | tee "$OUT/bench_triton_$which.txt" | grep "ms =" ; done
      [ "${OVERLAY_TESTS:-1}" = 1 ] && $OV python3 -m pytest -q -p no:cacheprovider --import-mode=importlib $XDIST \
        tests/test_kernels_fused.py tests/test_ttr_fused.py tests/test_ttr_fused_agreement.py tests/test_gpu_no_sync.py \
        tests/test_ttr_fused_window.py tests/test_exact_fp8.py tests/test_kernels_tma_landmarks.py 2>&1 | tail -n 15 \
        | tee "$OUT/tests_triton_overlay.log" ;;
    tune|all) python3 -m attnplug.bench.tune ${TUNE_ARGS:---sizes 1024,2048 --quick} 2>&1 | tee "$OUT/tune.log" ;;&
    profile|all) python3 -m attnplug.bench.profile_kernels ${PROFILE_ARGS:---sizes 1024,2048} 2>&1 | tee "$OUT/profile.log" ;;&
    bench|all) python3 -m attnplug.bench.run ${BENCH_ARGS:---sizes 1024,2048,4096 --dtypes bf16} --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt" ;;&
    model|all) python3 -m attnplug.bench.model ${MODEL_ARGS:---sizes 1024,2048} --json "$OUT/model.json" 2>&1 | tee "$OUT/model.txt" ;;&
    joint)
      export QUALITY_VARIANTS="${QUALITY_VARIANTS:-hybrid everywhere;joint shared;joint blend}" \
        QUALITY_SEEDS="${QUALITY_SEEDS:-0 1}" QUALITY_EVAL_WORKERS="${QUALITY_EVAL_WORKERS:-3}" \
        QUALITY_WAIT_S="${QUALITY_WAIT_S:-480}" QUALITY_KEEP="${QUALITY_KEEP:-0}" QUALITY_KEEP_BEST=1 ;;&
    bigbed-train)
      B=${BIGBED:-grid64}; mkdir -p $OUT/$B
      python3 -m attnplug.testbed.train --testbed $B --out $OUT/$B --device cuda ${BIGBED_TRAIN_ARGS:-} 2>&1 \
        | tee $OUT/$B/train.log ;;
    bigbed-sweep)
      QT=${QUALITY_TESTBED:-${BIGBED:-grid128}}
      [ $QT = grid128 ] && P="--runs 40 --prompts-per-run 4 --eval-prompts 16" || P="--runs 60 --prompts-per-run 8 --eval-prompts 32"
      export QUALITY_TESTBED=$QT QUALITY_PLAN="${QUALITY_PLAN:-$P}" QUALITY_LAYERS="${QUALITY_LAYERS:-single:*}" \
        QUALITY_SERVING="${QUALITY_SERVING:-single blocks,single blocks + call α}" QUALITY_WAIT_S="${QUALITY_WAIT_S:-500}" \
        QUALITY_VARIANTS="${QUALITY_VARIANTS:-product default;product default + landmarks 1 %;product default + landmarks max 256;product default + landmarks max 128}" ;;&
    transfer)
      T=/tmp/transfer; rm -rf $T; mkdir -p $T; : > $T/pids
      for src in ${TRANSFER_FROM:-default grid64}; do
        OMP_NUM_THREADS=1 setsid nohup python3 -m attnplug.testbed.transfer --out $T/$src --distil-on $src \
          --testbeds "${TRANSFER_TESTBEDS:-default,grid64}" --device cuda ${TRANSFER_ARGS:---eval-prompts 32} > $T/$src.log 2>&1 &
        echo $! >> $T/pids
      done
      wait_pids $T/pids ${TRANSFER_WAIT_S:-500}
      python3 -m attnplug.testbed.transfer --out $T --collect | tee $OUT/transfer.md
      cp $T/transfer.json $OUT/ 2>/dev/null; tail -n 3 $T/*.log
      for src in ${TRANSFER_FROM:-default grid64}; do  # the product default distilled there (stepcache's ttr rows)
        cp $T/$src/distilled_on_$src/ttr.safetensors $OUT/ttr_distilled_on_$src.safetensors 2>/dev/null; done ;;
    stepcache)
      S=/tmp/stepcache; rm -rf $S; mkdir -p $S; : > $S/pids
      sc_eval() {  # sc_eval NAME ARGS...: one `attnplug eval` in the background, its JSON in $S/NAME.json
        local n=$1; shift
        OMP_NUM_THREADS=1 setsid nohup python3 -m attnplug.cli eval "$@" --prompts ${STEPCACHE_PROMPTS:-32} \
          --device cuda --json $S/$n.json > $S/$n.log 2>&1 &
        echo $! >> $S/pids
      }
      for tb in ${STEPCACHE_TESTBEDS:-default grid64}; do
        cfg_var=STEPCACHE_CONFIG_$tb; ckpt_var=STEPCACHE_CKPT_$tb; cfg=${!cfg_var:-}; ckpt=${!ckpt_var:-}
        if [ $tb = default ]; then cfg=${cfg:-testbed/configs/serve_single_window.toml}; ckpt=${ckpt:-testbed/weights/ttr_window.safetensors}; fi
        [ -n "$ckpt" ] && sc_eval ${tb}_ttr_none --config $cfg --checkpoint $ckpt --testbed $tb
        for th in ${STEPCACHE_THRESHOLDS:-0.05 0.1 0.2}; do
          sc_eval ${tb}_exact_$th --config testbed/configs/serve_exact.toml --testbed $tb --step-cache fbcache:$th
          [ -n "$ckpt" ] && sc_eval ${tb}_ttr_$th --config $cfg --checkpoint $ckpt --testbed $tb --step-cache fbcache:$th
        done
      done
      wait_pids $S/pids ${STEPCACHE_WAIT_S:-480}
      python3 -m attnplug.testbed.step_cache $S | tee $OUT/stepcache.md
      (cd $S && tar czf $OUT/stepcache_results.tgz *.json *.log) ;;
    bigbed-bench) python3 -m attnplug.bench.run --sizes ${BIGBED_SIZES:-1024,2048} --dtypes bf16 --only session \
      --configs default,default-lm1pct,default-max256,default-max128,default-window1,default-window4,default-1layer-F64,default-1layer-F128 \
      --json "$OUT/bench_front.json" 2>"$OUT/bench_front.err" | tee "$OUT/bench_front.txt" ;;
    stepcache-bench) python3 -m attnplug.bench.model ${MODEL_ARGS:---sizes 1024,2048 --modes native,ttr-100,native/fbcache,ttr-100/fbcache} \
      --json "$OUT/model_fbcache.json" 2>&1 | tee "$OUT/model_fbcache.txt" ;;
  esac
  case $step in
    quality|joint|bigbed-sweep)
      Q=${QUALITY_DIR:-/tmp/quality}; rm -rf $Q; mkdir -p $Q; : > $Q/pids  # a warm machine keeps the last call's rows
      # QUALITY_FROM: the unpacked checkpoints.tgz of an earlier QUALITY_PHASE=distill call (carried), to evaluate
      [ -n "${QUALITY_FROM:-}" ] && cp -r "$QUALITY_FROM"/. $Q/ && : > $Q/pids
      IFS=';' read -ra VS <<< "${QUALITY_VARIANTS:-default;cosine lr;cosine lr 2× runs;offline fit;kernel-only;1-layer F64 hedgehog;1-layer F128 elu+1;landmarks 2 %;per-head φ;F256 + cosine lr;α_max 0.5 + cosine lr}"
      i=0
      for seed in ${QUALITY_SEEDS:-${QUALITY_SEED:-0}}; do for v in "${VS[@]}"; do
        i=$((i+1)); d=$Q/v$i; mkdir -p $d
        OMP_NUM_THREADS=1 setsid nohup python3 -m attnplug.testbed.quality --out $d --device "${QUALITY_DEVICE:-cuda}" \
          --variants "$v" --budget-s 1e9 --layers "${QUALITY_LAYERS:-}" --serving "${QUALITY_SERVING:-}" --seed "$seed" \
          ${QUALITY_TESTBED:+--testbed "$QUALITY_TESTBED"} \
          --eval-workers "${QUALITY_EVAL_WORKERS:-1}" --phase "${QUALITY_PHASE:-both}" \
          --distill-budget-s "${QUALITY_DISTILL_S:-0}" ${QUALITY_PLAN:-} > $d/log.txt 2>&1 &
        echo $! >> $Q/pids
      done; done
      for c in ${QUALITY_EVALS:-}; do
        n=$(basename $c .toml); OMP_NUM_THREADS=1 setsid nohup python3 -m attnplug.cli eval --config $c \
          --checkpoint testbed/weights/ttr_default.safetensors --prompts 64 --device "${QUALITY_DEVICE:-cuda}" --json $Q/eval_$n.json > $Q/eval_$n.log 2>&1 &
        echo $! >> $Q/pids
      done
      end=$((SECONDS + ${QUALITY_WAIT_S:-500}))
      while [ $SECONDS -lt $end ]; do alive=0; for p in $(cat $Q/pids); do kill -0 $p 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break; sleep 10; done
      ;;&
    quality|joint|bigbed-sweep)
      # at most 8 files come back: the table, one tarball of results, the best checkpoints (QUALITY_KEEP)
      Q=${QUALITY_DIR:-/tmp/quality}
      python3 -m attnplug.testbed.quality --out $Q --collect ${QUALITY_KEEP_BEST:+--keep-best $OUT} > $OUT/quality_table.md 2>&1
      [ -f $Q/effects.md ] && cp $Q/effects.md $OUT/effects.md
      (cd $Q && tar czf $OUT/quality_results.tgz --exclude='*.safetensors' --exclude=pids .)
      # a distill phase hands its checkpoints to the evaluate call: unpack into a carried folder, QUALITY_FROM=it
      if [ "${QUALITY_PHASE:-both}" = distill ]; then  # serving needs the backend component only (~3 MB a checkpoint)
        python3 - $Q <<'PY'
import sys
from pathlib import Path
from attnplug.core import load_checkpoint, save_checkpoint
for f in Path(sys.argv[1]).glob("v*/*/ttr.safetensors"):
    save_checkpoint(f, {k: v for k, v in load_checkpoint(f).items() if k.startswith("backend.")})
PY
        (cd $Q && tar czf $OUT/checkpoints.tgz --exclude=pids --exclude='log.txt' .)
      fi
      python3 - "$Q" "$OUT" "${QUALITY_KEEP:-3}" <<'PY'
import json, shutil, sys
from pathlib import Path
q, out, keep = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
rows = json.loads((q / "quality.json").read_text()) if (q / "quality.json").exists() else []
rows.sort(key=lambda r: r["serving"].get("single blocks", {}).get("adherence_drop_points", 99))
from attnplug.testbed.quality import folder_name
for r in rows[:keep]:
    for ck in q.glob(f"v*/{folder_name(r['variant'])}/ttr.safetensors"):
        shutil.copy(ck, out / f"ttr_{folder_name(r['variant'])}.safetensors"); print("kept", ck)
PY
      alive=0; for p in $(cat $Q/pids); do kill -0 $p 2>/dev/null && alive=$((alive+1)); done
      echo "quality processes still running: $alive"; tail -n 2 $Q/v*/log.txt; cat $OUT/quality_table.md ;;&
  esac
done
