#!/usr/bin/env bash
# `make demo` / `make tune-demo`: start a private Ray head on 127.0.0.1 (token auth), submit a job
# (JOB, default jobs/distill.py) to it, follow its logs, print the results, and stop only the head
# this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
JOB=${JOB:-jobs/distill.py}
CONFIG=${CONFIG:-configs/demo.yaml}
GCS_PORT=${RAY_DEMO_PORT:-6390}
DASHBOARD_PORT=${RAY_DEMO_DASHBOARD_PORT:-8265}
STATE=$ROOT/runs/.ray-head
TEMP_DIR=/tmp/lori-ray-$(id -u)-$GCS_PORT  # short: Ray's unix sockets live here

export PATH="$ROOT/.venv/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0
# Ray 2.60 turns token auth on for local clusters; this head and its clients share one token file.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token
mkdir -p "$STATE"
[ -s "$RAY_AUTH_TOKEN_PATH" ] || (umask 077; openssl rand -hex 32 > "$RAY_AUTH_TOKEN_PATH")

stop_head() {
  [ -s "$STATE/session" ] || return 0
  local sid; sid=$(cat "$STATE/session")
  echo "[demo] stopping the Ray head (session $sid)"
  pkill -TERM -s "$sid" 2>/dev/null || true
  for _ in $(seq 20); do pgrep -s "$sid" >/dev/null || break; sleep 0.5; done
  pkill -KILL -s "$sid" 2>/dev/null || true
  rm -f "$STATE/session"
}
trap stop_head EXIT

if curl -sf "http://127.0.0.1:$DASHBOARD_PORT" >/dev/null 2>&1; then
  echo "[demo] port $DASHBOARD_PORT is taken (another Ray?); set RAY_DEMO_DASHBOARD_PORT" >&2
  exit 1
fi

echo "[demo] starting a Ray head on 127.0.0.1:$GCS_PORT (dashboard http://127.0.0.1:$DASHBOARD_PORT)"
# setsid: every process of this head shares one session id, so stop_head kills exactly them.
# Multi-node off: every Ray process on 127.0.0.1 (docs/security.md); Ray Train's settings for one
# machine, as lori_ray/cluster.py LOCAL_TRAIN_SETTINGS gives a local cluster.
setsid bash -c 'echo $$ > "$0"; exec "$@"' "$STATE/session" \
  env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5 \
  ray start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
  --dashboard-agent-listen-port $((DASHBOARD_PORT + 44100)) --ray-client-server-port $((GCS_PORT + 1)) \
  --num-cpus "${RAY_DEMO_CPUS:-2}" --num-gpus 0 --temp-dir "$TEMP_DIR" --disable-usage-stats \
  > "$STATE/head.log" 2>&1 || { cat "$STATE/head.log"; exit 1; }

# Ray's own lines, left out of what the demo shows (LORI_VERBOSE=1 keeps them; `ray job logs` has them all):
# the job client's packaging and "next steps" banner, and Ray Train's controller starting each worker group
RAY_LINES='^[0-9/-]+ [0-9:,]+[[:space:]]+(INFO|SUCC|WARNING) (cli|packaging|dashboard_sdk|working_dir|sdk|job_manager|worker)\.py:'
RAY_LINES+='|\(TrainController pid=[0-9]+\).* (Requesting resources|Attempting to start training worker group|Started training worker group|world_rank=[0-9]+, local_rank)'
RAY_LINES+='|^Running entrypoint for job |\(TrainController pid=[0-9]+\)[^ ]* *$|\(RayTrainWorker pid=[0-9]+\).* Setting up process group for'
ray_lines() { if [ "${LORI_VERBOSE:-0}" = 1 ]; then cat; else grep --line-buffered -vE "$RAY_LINES" || true; fi; }

started=$(date +%s)
ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "runs", ".git", ".gpu"]}' \
  -- python "$JOB" --config "$CONFIG" "output_dir=$ROOT/runs" "$@" 2>&1 | ray_lines
name=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$CONFIG")
echo
echo "[demo] finished in $(( $(date +%s) - started ))s; MLflow store runs/$name/mlflow.db"
if [ -f "runs/$name/results.md" ]; then cat "runs/$name/results.md"; fi
