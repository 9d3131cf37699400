#!/usr/bin/env bash
# The GPU device check of bench/bench_gpu.py, in two steps:
#
#   bash scripts/device_check.sh prepare   # here: wheels + a pbc96 sample into .device/ (about 45 MB)
#   bash scripts/device_check.sh run       # on the GPU machine (device tool: carry [".device"]):
#                                          # installs the wheels, runs bench/bench_gpu.py on JAX
#
# The GPU machine has Python 3.12 with JAX (CUDA), PyTorch, numpy, pandas, pyarrow, h5py and
# Pillow, but no Keras, Dagster or TensorFlow, and no network: `prepare` downloads the pure-Python
# and cp312 wheels it lacks (Keras and its needs, dagster-pipes) and copies a class-stratified
# sample of pbc96 JPEGs (the device tool carries at most 64 MiB). `.device/` is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE_DIR=.device
SAMPLE_SHARE=${SAMPLE_SHARE:-40}  # percent of each pbc96 class folder to carry

prepare() {
  local shared=${BC_SHARED_DATASETS:-../shared/datasets}
  test -d "$shared/pbc96" || { echo "device_check: $shared/pbc96 not found (set BC_SHARED_DATASETS)" >&2; exit 2; }
  rm -rf "$DEVICE_DIR" && mkdir -p "$DEVICE_DIR/wheels" "$DEVICE_DIR/pbc96"
  local keras_version pipes_version
  keras_version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('keras'))")
  pipes_version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('dagster-pipes'))")
  local platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
                   --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  # Keras' own needs that the GPU image lacks: namex and optree (absl-py, h5py, ml-dtypes, numpy,
  # packaging and rich are there).
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEVICE_DIR/wheels" "keras==$keras_version" namex optree "dagster-pipes==$pipes_version"
  for class_dir in "$shared"/pbc96/*/; do
    local name files count
    name=$(basename "$class_dir")
    mkdir -p "$DEVICE_DIR/pbc96/$name"
    mapfile -t files < <(ls "$class_dir" | sort)
    count=$(( ${#files[@]} * SAMPLE_SHARE / 100 ))
    for file in "${files[@]:0:$count}"; do cp "$class_dir/$file" "$DEVICE_DIR/pbc96/$name/"; done
  done
  du -sh "$DEVICE_DIR"/* && ls "$DEVICE_DIR/wheels"
}

run() {
  test -d "$DEVICE_DIR/wheels" || { echo "device_check: run 'bash scripts/device_check.sh prepare' here first" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DEVICE_DIR"/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 bench/bench_gpu.py --data "$DEVICE_DIR/pbc96" --out "${OUT:-/tmp}/bench_gpu.json" "$@"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash scripts/device_check.sh prepare|run [bench_gpu.py options]" >&2; exit 2 ;;
esac
