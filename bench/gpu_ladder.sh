#!/usr/bin/env bash
# The implicit-reasoning ladder's 4x4 rung on one offline GPU machine (issue #16), in one command:
#
#   OUT=<dir> bash bench/gpu_ladder.sh [key=value ...]        # GPU: configs/implicit-4x4-gpu.yaml, BUDGET=560 s
#   OUT=/tmp/ladder TINY=1 bash bench/gpu_ladder.sh           # CPU proof of the path: tiny sizes, seconds-long budgets
#
# Unpacks the bundle like bench/gpu_suite.sh (bench/gpu_env.sh), then runs bench/accuracy.py on the preset:
# the CoT teacher, the trajectory store, and lori, icot_kd and nocot training side by side (--parallel 3) under
# wall-clock budgets, held-out = the iCoT 4x4 validation set when HELD_OUT names it (default
# .gpu/data/4x4_valid.txt: copy ../shared/data/icot/4x4_valid.txt there; .gpu is carried, never committed).
# Files in $OUT: ladder.log (everything), accuracy.md (the table), curves.png, curves.txt (every validation
# point: stage, step, exact match, seconds since the job began), env.txt. The whole command stays under BUDGET:
# past it the benchmark is stopped and curves.txt still holds every point it reached.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_ladder_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$SECONDS
TINY=${TINY:-0}
BUDGET=${BUDGET:-560}
LOG=$OUT/ladder.log
WORK=${WORK:-/tmp/gl}  # short: Ray's socket paths live under it
HELD_OUT=${HELD_OUT:-$ROOT/.gpu/data/4x4_valid.txt}
rm -rf "$WORK" && mkdir -p "$WORK"
: > "$LOG"

log() { echo "[ladder +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
step() {
  local name=$1 limit=$2 rc started=$SECONDS
  shift 2
  log "--- $name (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  log "--- $name: rc $rc after $((SECONDS - started))s"
  return $rc
}

export TMPDIR=$WORK
source "$ROOT/bench/gpu_env.sh"

{
  echo "# gpu_ladder $(date -u +%FT%TZ) on $(hostname); TINY=$TINY BUDGET=$BUDGET"
  git -C "$ROOT" log --oneline -1 2>/dev/null
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "(no nvidia-smi)"
  nproc; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt" >> "$LOG"
grep -q "^IMPORTS OK" "$LOG" || { log "imports failed: see $LOG"; exit 1; }

ARGS=(--config configs/implicit-4x4-gpu.yaml "output_dir=$WORK/runs")
if [ -f "$HELD_OUT" ]; then ARGS+=("data.eval_file=$HELD_OUT"); else log "no $HELD_OUT: held-out problems are generated"; fi
if [ "$TINY" = 1 ]; then
  ARGS+=(model.size=tiny data.train_size=3000 data.val_size=100 data.eval_size=50 cluster.gpus_per_worker=0
         cluster.gpus_per_actor=0 trajectory.num_actors=2 teacher.train.batch_size=32 student.train.batch_size=32
         teacher.train.log_every=10 teacher.train.eval_every=20 student.train.log_every=10
         student.train.eval_every=20 teacher.train.max_minutes=0.3 student.train.max_minutes=0.3 eval.batch_size=50
         cluster.num_cpus=4)
fi
left=$((BUDGET - (SECONDS - START) - 15))
log "benchmark: ${left}s left of the budget"
# the benchmark's lines go to ladder.log stamped with seconds since it began; those that tell the story to stdout
read -r -d '' STAMP <<'EOF'
import re
import sys
import time
started = time.time()
shown = re.compile(r"^\[(teacher|data|eval)\]|val_accuracy|stopped at|done in|^\| |^table|rror")
with open(sys.argv[1], "a") as log:
    for line in sys.stdin:
        seconds = time.time() - started
        log.write(f"{seconds:7.1f} {line}")
        log.flush()
        if shown.search(line) and "Reporting training result" not in line:
            print(f"{seconds:4.0f}s {line.rstrip()[:200]}", flush=True)
EOF
timeout -k 10 "$left" "$PY" bench/accuracy.py "${ARGS[@]}" "$@" --methods lori icot_kd nocot --parallel 3 2>&1 \
  | "$PY" -u -c "$STAMP" "$LOG"
rc=${PIPESTATUS[0]}
log "benchmark: rc $rc"

# every validation point of every stage: "stage step val_accuracy seconds-since-the-benchmark-began"
"$PY" - "$LOG" > "$OUT/curves.txt" <<'EOF'
import re
import sys
for line in open(sys.argv[1], errors="replace"):
    found = re.search(r"^ *([\d.]+) .*\[([\w.-]+)\] step (\d+)/\d+ .*?val_accuracy=([\d.e-]+)", line)
    if found:
        seconds, stage, step, accuracy = found.groups()
        print(stage, step, accuracy, seconds)
EOF
cp "$WORK"/runs/implicit-4x4*/accuracy.md "$WORK"/runs/implicit-4x4*/curves.png "$OUT"/ 2>/dev/null
log "done in $((SECONDS - START))s; files: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
