#!/usr/bin/env bash
# One entry point that sets up a fresh machine and runs a job:
#   bash run.sh demo    the main job: the paper's headline experiment (quadrant-split coordinate
#                       classification, CoordConv against the deconvolution baseline), ~3 minutes
#   bash run.sh test    the test suite (what CI runs)
#   bash run.sh bench   the benchmark: CoordConv vs nn.Conv2d vs the naive concatenation, all shapes
#   bash run.sh paper   every paper experiment: 3 tasks x 2 splits, CoordConv (3 seeds) and baseline (~30 minutes)
# Set-up is idempotent: it installs torch 2.14.1 (from this machine's local file when present) and
# this package in editable mode, reusing whatever is already installed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
  if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.14.1")' 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.14.1
  fi
  "$PY" -m pip install --quiet --no-build-isolation -e ".[test]"
}

job=${1:-demo}
shift || true
case "$job" in
  demo)  setup; "$PY" -m coordconv_fused.cli paper demo --split quadrant --seeds 0 "$@" ;;
  bench) setup; "$PY" -m coordconv_fused.cli bench --all-shapes "$@" ;;
  paper) setup; "$PY" -m coordconv_fused.cli paper all "$@" ;;
  test)  setup; "$PY" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh [demo|test|bench|paper] [args...]" >&2; exit 2 ;;
esac
