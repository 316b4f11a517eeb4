#!/usr/bin/env bash
# One GPU session's checks, in priority order, each bounded (a lent GPU machine has minutes, not hours):
# train a 256 px model on the GPU (timing), the throughput benchmark at 200x200 (decode processes, and
# with THREADS_TOO=1 threads for comparison), then with STEPS=all the sizing table and the throughput benchmark at 800x800.
# STEPS=quality instead: the quality benchmark at the shipped training defaults (256 px, 200 epochs,
# QUALITY_SEEDS, default 0) on the five synthetic categories, then the four written later, time-boxed.
# Results under $OUT (default: bench/results/gpu).
# Run on the device machine from the repo root, after putting the project's dependencies on
# PYTHONPATH (../shared/tools/device-wheels.sh isal imagecodecs py-spy, about 45 MB of the 64 MiB a
# call carries: without imagecodecs RGB PNGs decode through Pillow; py-spy's binary in .site/bin on
# PATH lets the throughput step sample the worker process); SCALE=tiny runs the same steps in seconds on a CPU
# to check the script. At most 8 files come back from a device call: STEPS=200 writes 8.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 CRD_LOG_LEVEL=warning
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/crd-inductor}  # the bench and its workers share compiled graphs
START=$(date +%s); BUDGET=${BUDGET:-560}
left() { local l=$((START + BUDGET - $(date +%s))); [ "$l" -lt 1 ] && l=1; [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
if [ "${SCALE:-full}" = tiny ]; then
  size=64 epochs=1 frames=16 batch=4 buckets=4 threads=2 sizing="--sizes 64 --batches 2 --iters 1 --teachers efficientnet_lite0"
  t_train=600 t_200=600 t_sizing=300 t_800=600 t_overhead=300 sides800=200 procs=2 loads="0.5 0.9" rounds=1
else
  size=256 epochs=3 frames=2048 batch=64 buckets=64 threads=12
  sizing="--sizes 256 384 --batches 32 128 --compile-only efficientnet_lite0@256 --iters 3"
  t_train=100 t_200=380 t_sizing=100 t_800=100 t_overhead=90 sides800=800 procs=12 loads=0.5 rounds=2
fi
log "start"; nvidia-smi -L 2>/dev/null | tee -a "$OUT/steps.log"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/steps.log"

if [ "${STEPS:-all}" = quality ]; then  # about 1.5 minutes per category and seed on an H200
  if [ "${SCALE:-full}" = tiny ]; then q="--image-size 64 --epochs 1 --categories disc"; qh="--image-size 64 --epochs 1 --categories gear"
  else q="--image-size 256 --epochs 200"; qh="$q --categories gear cookie hexnut lid"; fi
  seeds=${QUALITY_SEEDS:-0}
  log "quality ($q, seeds $seeds)"
  timeout "$(left $((BUDGET - 150)))" $PY bench/quality.py $q --seeds $seeds --no-write --out runs/gpu/quality \
    --json "$OUT/quality-gpu.json" 2>&1 | grep -v "^USDT" | tail -n 60 > "$OUT/quality-gpu.log"
  log "quality, held-out categories"
  timeout "$(left 600)" $PY bench/quality.py $qh --seeds $seeds --no-write --out runs/gpu/quality --section quality-heldout \
    --json "$OUT/quality-gpu-heldout.json" 2>&1 | grep -v "^USDT" | tail -n 60 > "$OUT/quality-gpu-heldout.log"
  log "done"; exit 0
fi

log "synth + train ($size px, $epochs epochs)"
timeout "$(left $t_train)" bash -c "$PY -m crd_model.cli synth --out runs/gpu/data --categories disc --n-train 100 >/dev/null &&
  $PY -m crd_model.cli train --data runs/gpu/data --category disc --out runs/gpu/model --image-size $size --epochs $epochs" \
  2>&1 | tail -n 12 | tee "$OUT/train.log"

run_throughput() {  # side, timeout, json
  timeout "$(left $2)" $PY bench/throughput.py --checkpoint runs/gpu/model --data runs/gpu/data --batch $batch --buckets $buckets \
    --frames $frames --sizes "$1" --decode-threads $threads --decode-processes $procs ${THREADS_TOO:+--also-threads} --latency-loads $loads --no-write \
    --profile-worker /tmp/crd-profile --json "$OUT/$3" 2>&1 | tail -n 60 > "$OUT/${3%.json}.log"
  [ -f "/tmp/crd-profile/pyspy-pipeline-$1.txt" ] && $PY bench/stack_summary.py "/tmp/crd-profile/pyspy-pipeline-$1.txt" \
    > "$OUT/pyspy-pipeline-$1-summary.txt"
}
for reach in runs pixels; do  # flood fills by runs (the GPU default) against by pixels (the CPU's)
  log "preprocessing profile, --reach $reach"; timeout "$(left 60)" $PY bench/preprocess_profile.py --data runs/gpu/data --size $size \
    --batches $batch $((batch * 2)) --reach $reach --json "$OUT/preprocess_profile-$reach.json" 2>&1 | grep "^{" \
    | tee -a "$OUT/steps.log"
done
log "throughput $size px model, 200x200 frames"; run_throughput 200 "$t_200" throughput-200.json
pkill -f "crd_model.cli work" 2>/dev/null
log "worker overhead, CRD_WORKER__FREEZE_STARTUP_OBJECTS on/off (stand-in model)"
timeout "$(left $t_overhead)" $PY bench/worker_overhead.py --data runs/gpu/data --frames $frames --batch $batch --decode-processes $procs \
  --rounds $rounds --toggle freeze-startup-objects --json "$OUT/worker_overhead.json" 2>&1 | grep "^|" | tee -a "$OUT/steps.log"
[ "${STEPS:-all}" = all ] || { pkill -f "crd_model.cli work" 2>/dev/null; log "done"; exit 0; }
pkill -f "crd_model.cli work" 2>/dev/null; log "sizing"; timeout "$(left $t_sizing)" $PY bench/sizing.py $sizing --no-write --json "$OUT/sizing.json" 2>&1 | tail -n 40 > "$OUT/sizing.log"
pkill -f "crd_model.cli work" 2>/dev/null; log "throughput, ${sides800}x${sides800} frames"; run_throughput "$sides800" "$t_800" throughput-800.json
pkill -f "crd_model.cli work" 2>/dev/null; log "done"
