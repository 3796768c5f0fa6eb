#!/usr/bin/env bash
# One-shot benchmark suite for the offline GPU machine (issue #20). From the project root:
#
#   OUT=/some/dir bash bench/gpu_suite.sh          # GPU: real sizes, 7 min budget (BUDGET=420 s)
#   OUT=/tmp/gpu_suite_out TINY=1 bash bench/gpu_suite.sh   # CPU proof of the code paths, tiny sizes
#
# What it does, every step under `timeout`, a failing step never stopping the next ones:
#   * env: nvidia-smi, disk, CPU, Python/torch versions  -> $OUT/env.txt
#   * bundle: when .gpu/site.tar.xz is here and the Python lacks ray (the GPU machine), unpack it to
#     /tmp/gpusite, drop the bundled packages the machine already has at a version the bundle accepts,
#     add DeepSpeed: .gpu/deepspeed-*.whl unzipped if present (a py3-none-any wheel built from the sdist
#     with `pip wheel --no-deps --no-build-isolation`; no ops compiled, they JIT-build as with the sdist),
#     else the sdist pip-installed (minutes). Build .gpu with /work/shared/gpu/make-bundle.sh, EXTRA_WHEELS
#     as in the issue #20 notes. Then an import check of ray, deepspeed, mlflow and our modules, early.
#     A rerun on the same (warm) machine reuses /tmp/gpusite; SECTIONS picks what to (re)run.
#   * sections, most important first: bench/throughput.py at 135m (32x512) and 1b (8x1024), train +
#     extraction (+ generation at 135m); bench/loss_overhead.py at 135m with a torch.profiler table;
#     135m with torch.compile (plain and ours, training only); 1b generation if time is left
#   * a section that would not fit in what is left of BUDGET is skipped; a section that fails or
#     times out keeps the rows it measured (throughput.py logs each one and rewrites its JSON)
# How .gpu was built (on a machine that reaches PyPI; pins from one pip resolution of ray[train,tune]
# 2.60.0 + mlflow-skinny + deepspeed's deps: make-bundle's unpinned list alone gets importlib-metadata 10,
# which needs lazy-importer, and cachetools 8, both outside mlflow-skinny 3.17's ranges):
#   EXTRA_WHEELS="<the list below>" bash /work/shared/gpu/make-bundle.sh
#   .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .gpu .gpu/deepspeed-0.19.8.tar.gz
#   annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 attrs==26.1.0 cachetools==7.3.3
#   certifi==2026.10.19.post1 charset-normalizer==3.5.3 click==8.5.1 cloudpickle==3.1.3
#   databricks-sdk==0.162.0 einops==0.8.2 fastapi==0.165.0 gitdb==4.0.12 gitpython==3.2.1 google-auth==2.63.0
#   h11==0.16.0 hjson==3.1.0 idna==3.20 importlib-metadata==9.1.0 jsonschema-specifications==2025.9.1
#   jsonschema==4.26.0 mlflow-skinny==3.17.2 msgpack==1.2.4 ninja==1.13.2 opentelemetry-api==1.45.2
#   opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
#   protobuf==7.36.2 psutil==7.2.2 py-cpuinfo==9.0.0 pyasn1-modules==0.4.2 pyasn1==0.6.5
#   pydantic-core==2.50.5 pydantic==2.14.4 python-dotenv==1.2.4 referencing==0.37.0 requests==2.34.2
#   rpds-py==2026.9.1 smmap==5.0.3 sqlalchemy==2.1.9 sqlparse==0.6.1 starlette==1.10.0 tensorboardx==2.6.5
#   typing-extensions==4.16.0 typing-inspection==0.4.5 urllib3==2.8.0 uvicorn==0.54.0 zipp==4.1.2
# pandas and pyarrow (ray.train needs them; pyarrow alone is 55 MB) are not in it: the machine's own. Beside it,
# .gpu/extra holds wheels bench/gpu_env.sh unzips into the site (pip download --no-deps --only-binary=:all:
# --python-version 3.12 ...): alembic mako markupsafe cryptography cffi pycparser (MLflow's SQL store) and
# datasets dill multiprocess fsspec (the tokenized cache; the machine has no datasets), at the venv's versions.
# Files in $OUT (flat): suite.log (everything), results.md (the tables), results.json (all figures,
# section status and timings), env.txt, profile.txt, failures.log (tails of failed sections, if any).
# Knobs: BUDGET (s), TINY=1, PY (python), BUNDLE=auto|1|0, BUNDLE_DIR (.gpu), SITE (/tmp/gpusite),
# SECTIONS (space-separated subset of: 135m 1b lori 135m-compile 1b-generate), PARTS_135M (the 135m section's
# measurements, default train,extract,generate: a rerun after one that measured training can ask for extract,generate).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_suite_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$SECONDS
TINY=${TINY:-0}
if [ "$TINY" = 1 ]; then BUDGET=${BUDGET:-1500}; else BUDGET=${BUDGET:-420}; fi
RESERVE=15  # seconds kept for the summary at the end
LOG=$OUT/suite.log
FAILS=$OUT/failures.log
WORK=${WORK:-/tmp/gs}  # short: Ray's socket paths live under it
RUN_TAG="gs$$"
rm -rf "$WORK" && mkdir -p "$WORK/json" "$WORK/status"
: > "$LOG"; rm -f "$FAILS"

log() { echo "[suite +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START) - RESERVE)); }

# Leftovers of a section (a Ray worker holding the GPU after a timeout): every process the section
# started carries GPU_SUITE_SECTION=<tag> in its environment; kill those, by pid.
cleanup_section() {
  local tag=$1 pids pid
  sleep 2
  pids=$(grep -lsz "^GPU_SUITE_SECTION=$tag\$" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$" || true)
  for pid in $pids; do
    log "killing leftover process $pid of $tag: $(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null | cut -c1-120)"
    kill -9 "$pid" 2>/dev/null
  done
}

# step NAME TIMEOUT CMD... : run CMD (output into suite.log), record status and seconds.
step() {
  local name=$1 limit=$2 rc started=$SECONDS
  shift 2
  log "--- $name (timeout ${limit}s): $*"
  env GPU_SUITE_SECTION="$RUN_TAG-$name" timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  cleanup_section "$RUN_TAG-$name"
  local status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; elif [ $rc != 0 ]; then status="failed (rc $rc)"; fi
  echo "$status|$((SECONDS - started))|$*" > "$WORK/status/$name"
  log "--- $name: $status after $((SECONDS - started))s"
  return $rc
}

# section NAME CAP MIN CMD... : a benchmark under min(CAP, time left); skipped if under MIN is left.
section() {
  local name=$1 cap=$2 min=$3 limit offset
  shift 3
  case " ${SECTIONS:-135m 1b lori 135m-compile 1b-generate} " in *" $name "*) ;; *) return 0 ;; esac
  limit=$(left); [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt "$min" ]; then
    log "=== skip $name: ${limit}s left of the budget, needs ${min}s"
    echo "skipped|0|$*" > "$WORK/status/$name"
    return 0
  fi
  # the section's scratch (model, DeepSpeed checkpoint: ~40 GB at peak for 1b, Ray's session): the disk
  # under $WORK, or /dev/shm when the disk is short of 45 GB and /dev/shm has more
  local scratch=$WORK/tmp/$name disk shm
  disk=$(df -B1G --output=avail "$WORK" 2>/dev/null | tail -n 1 | tr -d ' ')
  shm=$(df -B1G --output=avail /dev/shm 2>/dev/null | tail -n 1 | tr -d ' ')
  if [ "${disk:-0}" -lt 45 ] && [ "${shm:-0}" -gt "${disk:-0}" ]; then scratch=/dev/shm/gs/$name; fi
  mkdir -p "$scratch"
  offset=$(stat -c %s "$LOG")
  echo "$offset" > "$WORK/status/$name.offset"
  log "=== $name: scratch $scratch (${disk}G free on $WORK's disk, ${shm}G on /dev/shm)"
  TMPDIR=$scratch step "$name" "$limit" "$@"
  local rc=$?
  echo "$offset $(stat -c %s "$LOG")" > "$WORK/status/$name.offset"
  if [ $rc != 0 ]; then
    { echo "===== $name: $(cut -d'|' -f1 "$WORK/status/$name")"; tail -c +$((offset + 1)) "$LOG" | grep -v "^\[suite" | tail -n 80; echo; } >> "$FAILS"
  fi
  # print the section's rows on stdout as it goes (the device tool returns only stdout's tail)
  tail -c +$((offset + 1)) "$LOG" | grep -E "^\| |^device|^CE |LoRi overhead|\[throughput\] .* (done|failed) in" | cut -c1-200
  rm -rf "$scratch"
}

# ---------------------------------------------------------------- Python, environment, bundle, import check
source "$ROOT/bench/gpu_env.sh"

# ---------------------------------------------------------------- environment
{
  echo "# gpu_suite $(date -u +%FT%TZ) on $(hostname); TINY=$TINY BUDGET=$BUDGET PY=$PY"
  echo "## git"; git -C "$ROOT" log --oneline -1 2>/dev/null; git -C "$ROOT" status --short 2>/dev/null | head -20
  echo "## nvidia-smi"; timeout 20 nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  timeout 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version \
    --format=csv 2>&1 || true
  echo "## machine"; nproc; free -g 2>/dev/null | head -2; df -h /tmp "$ROOT" /dev/shm 2>/dev/null
  echo "## python"; "$PY" -V 2>&1
  timeout 60 "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else ''); \
print('transformers', transformers.__version__)" 2>&1
  echo "## env"; env | grep -E "^(TORCH_CUDA_ARCH_LIST|CUDA_VISIBLE_DEVICES|PYTHONPATH|RAY_|HF_|OMP_)" | sort
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$LOG"
log "env: $(grep -E '^torch ' "$OUT/env.txt" | head -1)"

# ---------------------------------------------------------------- benchmarks
TP="$PY bench/throughput.py"
if [ "$TINY" = 1 ]; then
  S135="--size tiny --batch 8 --seq 64 --steps 3 --peak-size 256"
  S1B="--size small --batch 4 --seq 64 --steps 3 --peak-size 256"
  EX135="--extract 64 --generate 8 --new-tokens 8"; EX1B="--extract 64"; GEN1B="--generate 8 --new-tokens 8"
  LORI="--size tiny --batch 8 --digits 4 --steps 2"
  CAP=(600 600 300 900 300); MIN=(30 30 20 60 30)
else
  S135="--size 135m --batch 32 --seq 512 --steps 20"
  S1B="--size 1b --batch 8 --seq 1024 --steps 15"
  EX135="--extract 4096 --generate 64 --new-tokens 64"; EX1B="--extract 2048"; GEN1B="--generate 64 --new-tokens 32"
  LORI="--size 135m --batch 256 --digits 5 --steps 30"
  CAP=(180 200 60 240 90); MIN=(60 90 25 90 45)
fi
J=$WORK/json
section 135m "${CAP[0]}" "${MIN[0]}" $TP $S135 $EX135 --parts "${PARTS_135M:-train,extract,generate}" --json "$J/135m.json"
section 1b "${CAP[1]}" "${MIN[1]}" $TP $S1B $EX1B --parts train,extract --json "$J/1b.json"
section lori "${CAP[2]}" "${MIN[2]}" "$PY" bench/loss_overhead.py $LORI --json "$J/lori.json" --profile "$OUT/profile.txt"
section 135m-compile "${CAP[3]}" "${MIN[3]}" $TP $S135 --compile --plain-compile --parts train --json "$J/135m-compile.json"
section 1b-generate "${CAP[4]}" "${MIN[4]}" $TP $S1B $GEN1B --parts generate --json "$J/1b-generate.json"

# ---------------------------------------------------------------- summary: results.md, results.json
log "summary"
{
  echo "# GPU suite results ($(date -u +%FT%TZ), TINY=$TINY)"
  echo
  # the command, date, commit and machine, as every bench script heads its results (lori_ray/provenance.py)
  timeout 30 "$PY" -m lori_ray.provenance -- env TINY="$TINY" BUDGET="${BUDGET:-}" SECTIONS="${SECTIONS:-}" \
    bash bench/gpu_suite.sh 2>/dev/null || echo "- machine: $(uname -sm), $(nproc) cores"
  grep -E "^torch |^transformers " "$OUT/env.txt"
  grep -E "^IMPORTS|^python -c" "$LOG" | tail -n 2
  for name in unpack prune deepspeed-unpack deepspeed-install imports 135m 1b lori 135m-compile 1b-generate; do
    [ -f "$WORK/status/$name" ] || continue
    IFS='|' read -r status seconds command < "$WORK/status/$name"
    echo
    echo "## $name: $status (${seconds}s)"
    echo
    echo "\`${command/#$PY /python }\`"
    if [ -f "$WORK/status/$name.offset" ]; then
      read -r first last < "$WORK/status/$name.offset"
      tail -c +$((first + 1)) "$LOG" | head -c $((${last:-$first} - first)) > "$WORK/section.out"
      echo
      if [ "$status" = ok ]; then  # the final table, and how long each measurement took
        grep -E "^\| |^device|^CE |LoRi overhead" "$WORK/section.out" | cut -c1-240
        timings=$(sed -nE 's/^\[throughput\] ([a-z_]+) (done|failed) in ([0-9.]+s).*/\1 \3/p' "$WORK/section.out" | paste -sd, -)
        [ -n "$timings" ] && { echo; echo "seconds per measurement: $timings"; }
      else  # what it measured before it failed or was cut off
        # (a cut-off training run still logged its worker's steps_per_s: tokens/s = that x batch x seq)
        grep -E "^\| |^device|^CE |LoRi overhead|^failed:|\[throughput\] .* (done|failed) in|\] step [0-9]+/[0-9]+ .*steps_per_s=" \
          "$WORK/section.out" | sed -E 's/^\[throughput\] (.*)/- \1/; s/^.*\[throughput\] (step .*)/- worker: \1/' | cut -c1-240
      fi
    fi
  done
  if [ -s "$OUT/profile.txt" ]; then echo; echo "## profile (top ops of CE + LoRi steps, lori section)"; echo; echo '```'; head -n 20 "$OUT/profile.txt" | cut -c1-200; echo '```'; fi
} > "$OUT/results.md"

timeout 30 "$PY" - "$WORK" "$OUT/results.json" "$((SECONDS - START))" "$BUDGET" "$TINY" <<'EOF' >> "$LOG" 2>&1
import json
import sys
from pathlib import Path
work, target = Path(sys.argv[1]), Path(sys.argv[2])
result = {"seconds": int(sys.argv[3]), "budget": int(sys.argv[4]), "tiny": sys.argv[5] == "1", "sections": {}}
for status in sorted((work / "status").glob("*")):
    if status.suffix == ".offset":
        continue
    state, seconds, command = status.read_text().strip().split("|", 2)
    entry = {"status": state, "seconds": int(seconds), "command": command}
    figures = work / "json" / f"{status.name}.json"
    if figures.is_file():
        try:
            entry["figures"] = json.loads(figures.read_text())
        except ValueError as error:
            entry["figures_error"] = str(error)
    result["sections"][status.name] = entry
target.write_text(json.dumps(result, indent=2))
print(f"wrote {target}")
EOF
[ -s "$OUT/results.json" ] || echo "{\"error\": \"summary failed, see suite.log\"}" > "$OUT/results.json"

echo; cat "$OUT/results.md"
[ -s "$FAILS" ] && { echo; echo "failures: see $FAILS ($(grep -c '^=====' "$FAILS") section(s))"; }
log "done in $((SECONDS - START))s; files: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK" /dev/shm/gs
exit 0
