# Sourced by the scripts that run on a lent GPU machine (bench/device_run.sh, bench/serve_check.sh): install the
# carried wheels once, make the repository importable as `attnplug`, record the GPU and versions in $OUT/gpu.txt.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl_testbed}; [ -d "$WHEELS" ] || WHEELS=.whl
SITE=${SITE:-/tmp/site}; PKGS=${PKGS:-/tmp/pkgs}  # other folders for a CPU smoke run beside others' work
if ls "$WHEELS"/*.whl >/dev/null 2>&1 && [ ! -f $SITE/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE "$WHEELS"/*.whl \
    && touch $SITE/.done || exit 1
fi
[ -d $SITE ] && export PYTHONPATH=$SITE:$PYTHONPATH
mkdir -p $PKGS && ln -sfn "$PWD" $PKGS/attnplug && export PYTHONPATH=$PKGS:$PYTHONPATH
# TRITON_OVERLAY: a Triton cut down by bench/slim_triton.sh (.tar.xz, carried), unpacked once into $OVERLAY_DIR;
# `device_run.sh triton-overlay` times it beside the installed one, and TRITON_OVERLAY_ON=1 runs every step under it
# (ahead of the installed Triton on PYTHONPATH, with its own compile cache)
if [ -n "${TRITON_OVERLAY:-}" ]; then
  OVERLAY_DIR=${OVERLAY_DIR:-/tmp/triton_overlay}
  if [ ! -f $OVERLAY_DIR/.done ]; then
    mkdir -p $OVERLAY_DIR && xz -dc "$TRITON_OVERLAY" | tar -x -C $OVERLAY_DIR && touch $OVERLAY_DIR/.done || exit 1
  fi
  if [ "${TRITON_OVERLAY_ON:-0}" = 1 ]; then
    export PYTHONPATH=$OVERLAY_DIR:$PYTHONPATH TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache_overlay} TRITON_BACKENDS_IN_TREE=1
  fi
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
