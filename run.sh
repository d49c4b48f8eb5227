#!/usr/bin/env bash
# One entry point that sets up a fresh machine and runs a job:
#   bash run.sh demo    the main job: the paper's headline experiment (quadrant-split coordinate
#                       classification, CoordConv against the deconvolution baseline)
#   bash run.sh test    the test suite (what CI runs)
#   bash run.sh bench   the benchmark: CoordConv vs nn.Conv2d vs the naive concatenation, all shapes
#   bash run.sh paper   every paper experiment: 3 tasks x 2 splits, CoordConv (3 seeds) and baseline
#   bash run.sh setup [bench|paper|test]   only the set-up
# Set-up installs torch 2.14.1 if no torch of that version is importable (pip takes it from a local
# file where the machine has one, else from PyPI), then this package in editable mode with its C++
# extension -- and skips both when nothing changed since the last set-up: the install is redone
# only when a source of the build (setup.py, pyproject.toml, csrc/) or the job's extras change.
# The test extras (onnx, onnxruntime, torchvision, hypothesis, ...) are installed for `test` only.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

say() { echo "[run.sh] $*" >&2; }

setup() {
  local extras=$1
  if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.14.1")' 2>/dev/null; then
    say "installing torch 2.14.1 (a few minutes on a new machine)"
    "$PY" -m pip install --progress-bar on torch==2.14.1
  fi
  # The stamp of the last successful install: a hash of what the build depends on, then the extras
  # installed. Nothing to do when the hash matches, the extras asked for are there and _C loads.
  local stamp_file=build/.run-sh-install-stamp
  local hash installed=""
  hash=$({ echo "${FORCE_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-} ${COORDCONV_NO_EXTENSION:-}";
           "$PY" -c 'import torch; print(torch.__version__)';
           cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat; } | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp_file" ] && [ "$(head -n 1 "$stamp_file")" = "$hash" ] \
      && "$PY" -c 'import os, sys, coordconv_fused.extension as e; sys.exit(e.LOAD_ERROR is not None and os.environ.get("COORDCONV_NO_EXTENSION") != "1")' 2>/dev/null; then
    installed=$(tail -n +2 "$stamp_file" | tr '\n' ' ')
    if [ -z "$extras" ] || grep -qx "$extras" <(tail -n +2 "$stamp_file"); then
      say "coordconv-fused is installed and up to date (no rebuild)"
      return
    fi
    # Built and current, only an extra is missing: install its requirements, without a rebuild.
    local reqs
    if reqs=$("$PY" -c 'import sys, tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]]))' "$extras" 2>/dev/null); then
      say "installing the requirements of the [$extras] extra (no rebuild)"
      mapfile -t reqs <<< "$reqs"
      "$PY" -m pip install --progress-bar off "${reqs[@]}" > build/pip-install.log 2>&1 \
        || { tail -n 30 build/pip-install.log >&2; say "the install failed; the whole log is build/pip-install.log"; exit 1; }
      echo "$extras" >> "$stamp_file"
      return
    fi
  fi
  extras=$(echo "$installed $extras" | tr ' ' '\n' | grep -v '^$' | sort -u | paste -sd, -)
  say "installing coordconv-fused${extras:+[$extras]} in editable mode and building its C++ extension (~1 minute)"
  mkdir -p build
  rm -f "$stamp_file"
  local status
  set +e
  "$PY" -m pip install --no-build-isolation -e ".${extras:+[$extras]}" > build/pip-install.log 2>&1 &
  local pid=$! waited=0
  while kill -0 "$pid" 2>/dev/null; do  # a line every 15 s: what pip is doing
    sleep 1; waited=$((waited + 1))
    if [ $((waited % 15)) -eq 0 ]; then say "  ${waited} s: $(grep -v '^ ' build/pip-install.log | tail -n 1 | cut -c1-100)"; fi
  done
  wait "$pid"; status=$?
  set -e
  if [ "$status" -ne 0 ]; then
    tail -n 30 build/pip-install.log >&2
    say "the install failed (exit $status); the whole log is build/pip-install.log"
    exit "$status"
  fi
  { echo "$hash"; echo "$extras" | tr ',' '\n'; } > "$stamp_file"
}

job=${1:-demo}
shift || true
case "$job" in
  setup) setup "${1:-}" ;;
  demo)  setup paper; "$PY" -m coordconv_fused.cli paper demo --split quadrant --seeds 0 "$@" ;;
  bench) setup bench; "$PY" -m coordconv_fused.cli bench --all-shapes "$@" ;;
  paper) setup paper; "$PY" -m coordconv_fused.cli paper all "$@" ;;
  test)  setup test; "$PY" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh [demo|test|bench|paper|setup] [args...]" >&2; exit 2 ;;
esac
