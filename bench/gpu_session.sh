#!/usr/bin/env bash
# One GPU session's checks, each bounded (a lent GPU machine has minutes, not hours). STEPS names them,
# in the order they run:
#   train        synth `disc` and train a 256 px model for 3 epochs on the GPU (timing; the model the
#                throughput steps serve)
#   profile      the device preprocessing alone, flood filling by runs and by pixels
#   throughput   bench/throughput.py at 200x200 (decode processes; THREADS_TOO=1 adds threads;
#                PER_DEVICE="2 3" adds the pipeline with that many worker processes on the GPU;
#                T_THROUGHPUT its time box in seconds, default 380: on 2026-11-28 one process, two
#                processes and the in-process steps took more than 330)
#   overhead     bench/worker_overhead.py, CRD_WORKER__FREEZE_STARTUP_OBJECTS on/off (stand-in model)
#   sizing       bench/sizing.py, the model alone
#   throughput800  bench/throughput.py at 800x800
#   quality      bench/quality.py at the shipped training defaults (256 px, EPOCHS, default 200) on
#                QUALITY_CATEGORIES (default: the five synthetic ones), seeds QUALITY_SEEDS (default 0),
#                one JSON per category so a time box keeps what finished
#   heldout      the same on the four categories written after the model was frozen
# Aliases: STEPS=all (default) = train profile throughput overhead sizing throughput800;
# STEPS=200 = train profile throughput overhead.
# Results under $OUT (default: bench/results/gpu). At most 8 files come back from a device call.
# Run on the device machine from the repo root, after putting the project's dependencies on
# PYTHONPATH (../shared/tools/device-wheels.sh isal imagecodecs py-spy, about 53 MB of the 64 MiB a
# call carries: without imagecodecs RGB PNGs decode through Pillow; py-spy's binary in .site/bin on
# PATH lets the throughput step sample the worker process). SCALE=tiny runs the same steps in seconds
# on a CPU to check the script.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 CRD_LOG_LEVEL=warning
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/crd-inductor}  # the bench and its workers share compiled graphs
START=$(date +%s); BUDGET=${BUDGET:-560}
left() { local l=$((START + BUDGET - $(date +%s))); [ "$l" -lt 1 ] && l=1; [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
steps=${STEPS:-all}
case "$steps" in
  all) steps="train profile throughput overhead sizing throughput800" ;;
  200) steps="train profile throughput overhead" ;;
esac
if [ "${SCALE:-full}" = tiny ]; then
  size=64 epochs=1 frames=16 batch=4 buckets=4 threads=2 sizing="--sizes 64 --batches 2 --iters 1 --teachers efficientnet_lite0"
  t_train=600 t_200=600 t_sizing=300 t_800=600 t_overhead=300 sides800=200 procs=2 loads="0.5 0.9" rounds=1
  q="--image-size 64 --epochs 1" qcats=${QUALITY_CATEGORIES:-disc} qheld="gear"
else
  size=256 epochs=3 frames=2048 batch=64 buckets=64 threads=12
  sizing="--sizes 256 384 --batches 32 128 --compile-only efficientnet_lite0@256 --iters 3"
  t_train=100 t_200=${T_THROUGHPUT:-380} t_sizing=100 t_800=100 t_overhead=90 sides800=800 procs=12 loads=0.5 rounds=2
  q="--image-size 256 --epochs ${EPOCHS:-200}" qcats=${QUALITY_CATEGORIES:-block disc dome rod tile} qheld="gear cookie hexnut lid"
fi
has() { case " $steps " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
stop_workers() { pkill -f "crd_model.cli work" 2>/dev/null; }
log "start ($steps)"; nvidia-smi -L 2>/dev/null | tee -a "$OUT/steps.log"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/steps.log"

if has train; then
  log "synth + train ($size px, $epochs epochs)"
  timeout "$(left $t_train)" bash -c "$PY -m crd_model.cli synth --out runs/gpu/data --categories disc --n-train 100 >/dev/null &&
    $PY -m crd_model.cli train --data runs/gpu/data --category disc --out runs/gpu/model --image-size $size --epochs $epochs" \
    2>&1 | tail -n 12 | tee "$OUT/train.log"
fi

run_throughput() {  # side, timeout, json
  timeout "$(left $2)" $PY bench/throughput.py --checkpoint runs/gpu/model --data runs/gpu/data --batch $batch --buckets $buckets \
    --frames $frames --sizes "$1" --decode-threads $threads --decode-processes $procs ${THREADS_TOO:+--also-threads} \
    ${PER_DEVICE:+--processes-per-device $PER_DEVICE} --latency-loads $loads --no-write \
    --profile-worker /tmp/crd-profile --json "$OUT/$3" 2>&1 | tail -n 60 > "$OUT/${3%.json}.log"
  [ -f "/tmp/crd-profile/pyspy-pipeline-$1.txt" ] && $PY bench/stack_summary.py "/tmp/crd-profile/pyspy-pipeline-$1.txt" \
    > "$OUT/pyspy-pipeline-$1-summary.txt"
  stop_workers
}
if has profile; then
  for reach in runs pixels; do  # flood fills by runs (the GPU default) against by pixels (the CPU's)
    log "preprocessing profile, --reach $reach"; timeout "$(left 60)" $PY bench/preprocess_profile.py --data runs/gpu/data --size $size \
      --batches $batch $((batch * 2)) --reach $reach --json "$OUT/preprocess_profile-$reach.json" 2>&1 | grep "^{" \
      | tee -a "$OUT/steps.log"
  done
fi
if has throughput; then log "throughput $size px model, 200x200 frames"; run_throughput 200 "$t_200" throughput-200.json; fi
if has overhead; then
  log "worker overhead, CRD_WORKER__FREEZE_STARTUP_OBJECTS on/off (stand-in model)"
  timeout "$(left $t_overhead)" $PY bench/worker_overhead.py --data runs/gpu/data --frames $frames --batch $batch --decode-processes $procs \
    --rounds $rounds --toggle freeze-startup-objects --json "$OUT/worker_overhead.json" 2>&1 | grep "^|" | tee -a "$OUT/steps.log"
  stop_workers
fi
if has sizing; then
  log "sizing"; timeout "$(left $t_sizing)" $PY bench/sizing.py $sizing --no-write --json "$OUT/sizing.json" 2>&1 | tail -n 40 > "$OUT/sizing.log"
fi
if has throughput800; then log "throughput, ${sides800}x${sides800} frames"; run_throughput "$sides800" "$t_800" throughput-800.json; fi
quality() {  # section, categories...
  local section=$1; shift
  for c in "$@"; do  # about 1.5 minutes per category and seed on an H200 at 200 epochs
    log "quality $c ($q, seeds ${QUALITY_SEEDS:-0})"
    timeout "$(left 600)" $PY bench/quality.py $q --categories "$c" --seeds ${QUALITY_SEEDS:-0} --no-write --out runs/gpu/quality \
      --section "$section" --json "$OUT/quality-gpu-$c.json" 2>&1 | grep -v "^USDT" | tail -n 30 >> "$OUT/quality-gpu.log"
  done
}
if has quality; then quality quality $qcats; fi
if has heldout; then quality quality-heldout $qheld; fi
log "done"
