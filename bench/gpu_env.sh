# Sourced by the GPU scripts (bench/gpu_suite.sh, bench/gpu_ladder.sh) once they have defined ROOT, WORK, LOG and
# the functions `log MESSAGE` and `step NAME TIMEOUT CMD...`: chooses PY (unless given) and the environment every
# GPU script runs under, then, on the offline GPU machine, unpacks the bundle built by ../shared/gpu/make-bundle.sh
# (ray, DeepSpeed, MLflow; see gpu_suite.sh's header for how .gpu is built) and checks the imports.
# Knobs: PY, BUNDLE (auto|1|0), BUNDLE_DIR (.gpu), SITE (/tmp/gpusite).
if [ -z "${PY:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3); fi
fi
BUNDLE=${BUNDLE:-auto}
BUNDLE_DIR=${BUNDLE_DIR:-$ROOT/.gpu}
SITE=${SITE:-/tmp/gpusite}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_DISABLE_TELEMETRY=1
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_DEDUP_LOGS=0 RAY_DISABLE_IMPORT_WARNING=1
export MLFLOW_ENABLE_ASYNC_LOGGING=false
unset RAY_ADDRESS MLFLOW_TRACKING_URI
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- bundle (GPU machine)
if [ "$BUNDLE" = auto ]; then
  if [ -f "$BUNDLE_DIR/site.tar.xz" ] && ! "$PY" -c "import ray" 2>/dev/null; then BUNDLE=1; else BUNDLE=0; fi
fi
if [ "$BUNDLE" = 1 ]; then
  if [ ! -d "$SITE/ray" ]; then
    mkdir -p "$(dirname "$SITE")"
    rm -rf "$WORK/unpack" && mkdir -p "$WORK/unpack"
    step unpack 120 tar -xJf "$BUNDLE_DIR/site.tar.xz" -C "$WORK/unpack" \
      && rm -rf "$SITE" && mv "$WORK/unpack/gpusite" "$SITE"
    # the machine's own copy of a package wins where it satisfies what the bundle asks of it
    step prune 60 env -u PYTHONPATH "$PY" - "$SITE" <<'EOF'
import importlib.metadata as md
import os
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

site = Path(sys.argv[1])
bundle = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions(path=[str(site)])}
# deepspeed's and lori-ray's own requirements count too (deepspeed is installed after this)
requirements = [Requirement(r) for r in ("einops", "hjson", "msgpack", "ninja", "numpy", "packaging>=20.0", "psutil",
                                         "py-cpuinfo", "pydantic>=2", "tqdm", "pyyaml", "safetensors", "pyarrow>=17",
                                         "pandas", "fsspec", "requests")]
for name, dist in bundle.items():
    extras = {"", "train", "tune"} if name == "ray" else {""}
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras):
            requirements.append(requirement)
wanted = {}
for requirement in requirements:
    wanted.setdefault(canonicalize_name(requirement.name), []).append(requirement.specifier)
for name, dist in sorted(bundle.items()):
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        continue
    specs = [s for s in wanted.get(name, []) if str(s)]
    if not all(s.contains(have, prereleases=True) for s in specs):
        print(f"keep bundled {name} {dist.version}: the machine's {have} does not satisfy {','.join(map(str, specs))}")
        continue
    version, roots = dist.version, set()
    for file in dist.files or []:
        path = (site / file).resolve()
        if site.resolve() in path.parents:
            path.unlink(missing_ok=True)
            roots.add(site / Path(file).parts[0])
    for root in roots:  # remove what is left empty
        for directory, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
            if os.path.isdir(directory) and not os.listdir(directory):
                os.rmdir(directory)
    print(f"use the machine's {name} {have} (bundle: {version})")
EOF
  fi
  export PYTHONPATH="$ROOT:$SITE"
  if [ ! -d "$SITE/deepspeed" ]; then
    # a py3-none-any wheel built from the same sdist (no ops compiled: they JIT-build on first use, as with
    # the sdist) unpacks in a second; building the sdist here runs every op's compatibility probe (minutes)
    wheel=$(ls "$BUNDLE_DIR"/deepspeed-*.whl 2>/dev/null | head -1)
    if [ -n "$wheel" ]; then step deepspeed-unpack 60 "$PY" -m zipfile -e "$wheel" "$SITE"; fi
    if [ ! -f "$SITE/deepspeed/__init__.py" ]; then
      step deepspeed-install 240 "$PY" -m pip install -q --no-build-isolation --no-deps --no-cache-dir \
        --target "$SITE" "$BUNDLE_DIR"/deepspeed-*.tar.gz
    fi
  fi
  # extra wheels beside the bundle: MLflow's SQL store needs alembic, mako, markupsafe, cryptography (cffi, pycparser),
  # which mlflow-skinny lacks; the tokenized cache needs datasets (dill, multiprocess, fsspec), which the machine lacks
  for wheel in "$BUNDLE_DIR"/extra/*.whl; do
    if [ -f "$wheel" ]; then step "unzip-$(basename "$wheel" | cut -d- -f1)" 60 "$PY" -m zipfile -e "$wheel" "$SITE"; fi
  done
  ninja_bin=$(ls -d "$SITE"/ninja-*.data/scripts 2>/dev/null | head -1)
  if ! command -v ninja >/dev/null && [ -n "$ninja_bin" ]; then chmod +x "$ninja_bin/ninja"; export PATH="$PATH:$ninja_bin"; fi
fi
log "PYTHONPATH=$PYTHONPATH"

# ---------------------------------------------------------------- import check (printed early)
step imports 150 "$PY" - <<'EOF'
import importlib
import time
started = time.time()
failed = []
for name in ("torch", "transformers", "ray", "deepspeed", "mlflow", "pydantic", "pyarrow.fs", "pandas", "msgpack",
             "datasets", "ray.train", "ray.train.torch", "lori_ray.worker", "lori_ray.driver", "lori_ray.teacher_pool", "lori_ray.tracking",
             "lori_ray.tokenized", "mlflow.store.tracking.sqlalchemy_store"):
    try:
        module = importlib.import_module(name)
        print(f"import {name} OK {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}", flush=True)
    except Exception as error:  # noqa: BLE001
        failed.append(name)
        print(f"import {name} FAILED: {type(error).__name__}: {error}", flush=True)
import torch
if torch.cuda.is_available():
    from deepspeed.accelerator import get_accelerator
    print("deepspeed accelerator:", get_accelerator()._name, "| cuda", torch.version.cuda,
          "| device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
if not failed:  # the SQL tracking store our runs use, end to end (its migrations import more than the module)
    import tempfile
    import mlflow
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/probe.db")
        mlflow.set_experiment("probe")
        print("mlflow sqlite store OK", flush=True)
    except Exception as error:  # noqa: BLE001
        failed.append("mlflow sqlite store")
        print(f"mlflow sqlite store FAILED: {type(error).__name__}: {error}", flush=True)
print(f"IMPORTS {'FAILED: ' + ', '.join(failed) if failed else 'OK'} ({time.time() - started:.1f}s)")
raise SystemExit(1 if failed else 0)
EOF
grep -E "^import .*FAILED|^IMPORTS" "$LOG" | tail -n 15
timeout 60 "$PY" -c "import ray, deepspeed, mlflow; print('python -c \"import ray, deepspeed, mlflow\": OK', ray.__version__, deepspeed.__version__, mlflow.__version__)" 2>&1 | tail -n 3 | tee -a "$LOG"

