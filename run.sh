#!/usr/bin/env bash
# One entry point that sets up a fresh machine and runs a job:
#   bash run.sh demo    the main job: the paper's headline experiment (quadrant-split coordinate
#                       classification, CoordConv against the deconvolution baseline)
#   bash run.sh test    the test suite (what CI runs)
#   bash run.sh bench   the benchmark: CoordConv vs nn.Conv2d vs the naive concatenation, all shapes
#   bash run.sh paper   every paper experiment: 3 tasks x 2 splits, CoordConv (3 seeds) and baseline;
#                       then detection, GAN and VAE, conv and CoordConv models (3 seeds each)
#   bash run.sh setup [bench|paper|test]   only the set-up
#   bash run.sh test-torch V   the test suite against torch V (e.g. 2.11.0), in a venv and a copy of
#                       this commit under build/torch-V/ (this checkout's own build is untouched)
#   bash run.sh gpu-check   on a GPU machine whose PyTorch is preinstalled (any version, no network):
#                       build the extension for the visible GPU, run the CUDA tests and the GPU
#                       benchmark, and pack logs, JSON and plots into one archive (OUT or results/)
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
  say "installing coordconv-fused${extras:+[$extras]} in editable mode and building its C++ extension (minutes on 2 cores; more with FORCE_CUDA=1)"
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

# After a test process died of a signal (faulthandler's "Fatal Python error" in the log `$1`): the
# first test function named in such a traceback, run again alone (its cuda cases, stopping at the
# first failure) under gdb or the CUDA toolkit's cuda-gdb, for the native backtrace that the Python
# one lacks; written to `$2`, within `$3` seconds.
native_backtrace() {
  local log=$1 out=$2 seconds=$3 test debugger python
  test=$(awk '/Fatal Python error/ { hit = 1 }
    hit && match($0, /tests\/test_[a-z0-9_]+\.py", line [0-9]+ in test_[A-Za-z0-9_]+/) {
      split(substr($0, RSTART, RLENGTH), part, /", line [0-9]+ in /); print part[1] "::" part[2]; exit }' "$log")
  [ -n "$test" ] || return 0
  debugger=$(command -v gdb || command -v "${CUDA_HOME:-/usr/local/cuda}/bin/cuda-gdb" || true)
  if [ -z "$debugger" ]; then
    say "a test process crashed in $test; no gdb or cuda-gdb here for a native backtrace"
    return 0
  fi
  say "a test process crashed in $test: running it again alone under $(basename "$debugger") (log: $out)"
  python=$("$PY" -c 'import sys; print(sys.executable)')  # (the interpreter itself, not a wrapper script)
  timeout "$seconds" "$debugger" -q -batch -ex "set pagination off" -ex run -ex "bt 40" -ex "info registers rip" \
    --args "$python" -X faulthandler -m pytest -x -q -p no:cacheprovider -k cuda "$test" > "$out" 2>&1 || true
  grep -a -A 30 "received signal" "$out" >&2 || say "no signal under the debugger (see $out)"
}

gpu_check() {
  # Nothing is installed from a registry here: the machine's own torch (and Triton) are used as they are.
  # The whole check keeps to GPU_CHECK_SECONDS (default 460): each stage runs under `timeout` with
  # what is left, the benchmark's share held back, and every log is written as it goes, so a stage
  # cut short still leaves its partial log.
  local out_dir=${OUT:-results}/gpu-check start=$SECONDS budget=${GPU_CHECK_SECONDS:-460}
  local bench_share=${GPU_BENCH_SECONDS:-150}
  left() { local s=$((budget - (SECONDS - start) - ${1:-0})); echo $((s > 10 ? s : 10)); }
  local rc workers=()
  "$PY" -c 'import xdist' 2>/dev/null && workers=(-n "${GPU_TEST_WORKERS:-$(nproc)}")
  mkdir -p "$out_dir"
  {
    "$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
torch.backends.cudnn.version()); print(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else sys.exit("no GPU visible")'
    "$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not installed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    nproc
  } 2>&1 | tee "$out_dir/machine.txt"
  local arch stamp
  arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  # A build of the same sources for the same torch and GPU, brought back from an earlier check
  # (.gpu-build/gpu-build.tar.gz, which the check writes to OUT), is reused instead of compiled again.
  stamp=$({ "$PY" -c 'import torch; print(torch.__version__)'; echo "$arch"; cat setup.py;
            find csrc -type f | sort | xargs cat; } | sha256sum | cut -d' ' -f1)
  if [ -f .gpu-build/gpu-build.tar.gz ] && [ "$(tar xzOf .gpu-build/gpu-build.tar.gz build-stamp.txt 2>/dev/null)" = "$stamp" ]; then
    tar xzf .gpu-build/gpu-build.tar.gz --exclude build-stamp.txt
    say "reusing the extension built earlier for these sources (.gpu-build/)"
  else
    say "building the extension for sm_${arch/./} (log: $out_dir/build.log)"
    FORCE_CUDA=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      timeout "$(left $((bench_share + 60)))" \
      "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . > "$out_dir/build.log" 2>&1 \
      || { tail -n 40 "$out_dir/build.log" >&2; say "the build failed or ran out of time"; }
    echo "$stamp" > build-stamp.txt
    tar czf "${OUT:-results}/gpu-build.tar.gz" build-stamp.txt coordconv_fused/_C*.so 2>/dev/null || true
    rm -f build-stamp.txt
  fi
  say "built after $((SECONDS - start)) s; CUDA tests (log: $out_dir/tests.log)"
  # The CUDA tests: every test parametrized on device "cuda", one process per core (Triton compiles
  # each kernel specialisation once per process; its autotuning is off: one fixed configuration).
  rc=0
  COORDCONV_TRITON_AUTOTUNE=0 COORDCONV_EXPECT_CUDA=1 timeout "$(left "$bench_share")" \
    "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" -k "cuda" --durations=10 \
    tests/test_parity.py tests/test_second_order.py tests/test_no_sync.py tests/test_ops.py \
    tests/test_extension.py tests/test_property.py tests/test_compile.py -o addopts="-ra" > "$out_dir/tests.log" 2>&1 || rc=$?
  say "tests exit $rc after $((SECONDS - start)) s"; tail -n 40 "$out_dir/tests.log"
  if grep -q "Fatal Python error" "$out_dir/tests.log"; then
    local debug_seconds; debug_seconds=$(left "$bench_share")
    native_backtrace "$out_dir/tests.log" "$out_dir/crash-backtrace.log" $((debug_seconds < 90 ? debug_seconds : 90))
  fi
  say "GPU benchmark (log: $out_dir/bench.log)"
  rc=0
  COORDCONV_TRITON_AUTOTUNE=${COORDCONV_TRITON_AUTOTUNE:-0} PYTHONUNBUFFERED=1 timeout "$(left 5)" \
    "$PY" -m coordconv_fused.cli bench --device cuda --rounds "${GPU_BENCH_ROUNDS:-15}" --out "$out_dir" \
    "${GPU_BENCH_ARGS[@]}" > "$out_dir/bench.log" 2>&1 || rc=$?
  say "bench exit $rc after $((SECONDS - start)) s"
  tr '\r' '\n' < "$out_dir/bench.log" | grep -av "bench cuda:" | tail -n 90 || true
  tar czf "${OUT:-results}/gpu-check.tar.gz" -C "$(dirname "$out_dir")" "$(basename "$out_dir")"
  # (on a lent machine only a few files come back: once packed, the archive alone)
  [ -n "${OUT:-}" ] && rm -rf "$out_dir"
  say "wrote ${OUT:-results}/gpu-check.tar.gz in $((SECONDS - start)) s"
}

test_torch() {
  # Another torch release: its own venv and a clone of HEAD (an editable build puts the extension in
  # the source tree, so the two builds cannot share one). torchvision 0.(minor+15) is the release
  # built for torch 2.minor; Triton < 3.7's interpreter (TRITON_INTERPRET=1, the CPU tests of the
  # Triton kernels) fails under NumPy 2.4, hence the cap there.
  local version=${1:?usage: bash run.sh test-torch VERSION (e.g. 2.11.0)}
  shift
  local dir=build/torch-$version minor
  minor=$(echo "$version" | cut -d. -f2)
  mkdir -p "$dir"
  [ -x "$dir/venv/bin/python" ] || "$PY" -m venv "$dir/venv"
  local vpy=$dir/venv/bin/python
  if ! "$vpy" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != sys.argv[1])' "$version" 2>/dev/null; then
    say "installing torch $version and the test requirements into $dir/venv"
    "$vpy" -m pip install --progress-bar off "torch==$version" "torchvision==0.$((minor + 15)).*" > "$dir/pip.log" 2>&1 \
      || { tail -n 20 "$dir/pip.log" >&2; exit 1; }
  fi
  local reqs
  reqs=$("$PY" -c 'import tomllib; print("\n".join(r for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"] if not r.startswith("torchvision")))')
  mapfile -t reqs <<< "$reqs"
  "$vpy" -m pip install --progress-bar off "${reqs[@]}" setuptools wheel ninja >> "$dir/pip.log" 2>&1 \
    || { tail -n 20 "$dir/pip.log" >&2; exit 1; }
  if "$vpy" -c 'import sys, triton; sys.exit(tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 7))' 2>/dev/null; then
    "$vpy" -m pip install --progress-bar off "numpy<2.4" >> "$dir/pip.log" 2>&1
  fi
  rm -rf "$dir/src"
  git clone -q . "$dir/src"
  say "building the extension against torch $version (log: $dir/build.log)"
  (cd "$dir/src" && "../venv/bin/python" -m pip install --no-deps --no-build-isolation -e . > ../build.log 2>&1) \
    || { tail -n 30 "$dir/build.log" >&2; exit 1; }
  (cd "$dir/src" && "../venv/bin/python" -m pytest -q -p no:cacheprovider "$@")
}

job=${1:-demo}
shift || true
case "$job" in
  setup) setup "${1:-}" ;;
  gpu-check) GPU_BENCH_ARGS=("$@"); gpu_check ;;
  demo)  setup paper; "$PY" -m coordconv_fused.cli paper demo --split quadrant --seeds 0 "$@" ;;
  bench) setup bench; "$PY" -m coordconv_fused.cli bench --all-shapes "$@" ;;
  paper) setup paper; "$PY" -m coordconv_fused.cli paper all "$@"
         "$PY" -m coordconv_fused.cli paper extended "$@" ;;
  test)  setup test; "$PY" -m pytest -q "$@" ;;
  test-torch) test_torch "$@" ;;
  *) echo "usage: bash run.sh [demo|test|bench|paper|setup|test-torch|gpu-check] [args...]" >&2; exit 2 ;;
esac
