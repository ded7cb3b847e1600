#!/usr/bin/env bash
# One-command verification of mage-kernels on a CUDA GPU machine (finishes in < 10 minutes).
#
#   bash bench/gpu_check.sh
#
# Steps, most valuable results first. Each runs under `timeout` with a limit of
# min(its own maximum, what is left of the global budget $MAGE_GPU_CHECK_BUDGET
# (default 560 s) minus a reserve for the kill grace and the summary); a step whose
# limit would fall below its minimum useful time is skipped, with a log line.
#   1. environment: GPU, driver, CUDA, torch, triton, nvcc, cmake, compute-sanitizer  (max  15 s)
#   2. build the CUDA extension in place (MAGE_CUDA_ARCH, default 9.0 to save time)    (max 150 s)
#      and check it loads and its op schemas equal the Python ops'                      (max  20 s)
#   3. the whole test suite with COMPILED Triton on CUDA tensors: TRITON_INTERPRET=0,
#      the Triton-backend tests take tests/conftest.py's `device` fixture (cuda here),
#      and MAGE_REQUIRE_CUDA_TESTS=1 makes pytest refuse to start if it would be cpu.
#      The kernel test files run first, so that a run cut short by its limit has
#      already checked the kernels (pytest is stopped with SIGINT and still writes
#      its JUnit XML)                                                                     (max 200 s)
#   4. the benchmark suites (pytest bench --benchmark-only)                              (max 150 s)
#   -- these maxima sum to 535 s; the steps below share what is left of the budget --
#   5. the CUDA backend tests (tests/test_cuda_backend.py, tests/test_cuda_sources.py)  (max  60 s)
#   6. compute-sanitizer memcheck of the ops (Python workload)                           (max  90 s)
#   7. the standalone CMake build and its C++ parity test (ctest)                        (max 120 s)
#   8. compute-sanitizer memcheck and racecheck of the C++ test binary                  (max 60 s each)
# Results: $OUT (when set, e.g. by a remote runner) or bench/results/, as
#   gpu_check_<date>_<gpu>.log   everything printed
#   gpu_check_<date>_<gpu>.json  environment, per-step status/duration, test summaries
# plus the pytest JUnit XML files, the benchmark JSON and Markdown table.
# Exit status: 0 when every step that ran passed (a step skipped because its tool
# is missing or the budget ran out does not fail the run), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

BUDGET=${MAGE_GPU_CHECK_BUDGET:-560}
RESERVE=15  # kept free at every step: `timeout --kill-after=10` grace + the final summary
START=$(date +%s)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
GPU_NAME=$( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo no-gpu) | head -1)
GPU_TAG=$(echo "$GPU_NAME" | tr -c 'A-Za-z0-9\n' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
RESULTS=${OUT:-$ROOT/bench/results}
mkdir -p "$RESULTS"
BASE="$RESULTS/gpu_check_${STAMP}_${GPU_TAG}"
LOG="$BASE.log"
STEPS="$BASE.steps.tsv"
: >"$STEPS"
exec > >(tee -a "$LOG") 2>&1

export TRITON_INTERPRET=0             # compiled Triton; tests/conftest.py only sets it when unset
export MAGE_REQUIRE_CUDA_TESTS=1      # tests/conftest.py: refuse to run the Triton tests on CPU tensors
export MAGE_REQUIRE_CUDA_EXTENSION=1  # tests/test_cuda_backend.py: a missing GPU/extension fails, not skips
export MAGE_CUDA_ARCH=${MAGE_CUDA_ARCH:-9.0}
export PYTHONUNBUFFERED=1

remaining() { echo $((START + BUDGET - $(date +%s))); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; }

# step NAME MAX_SECONDS MIN_SECONDS COMMAND...: run COMMAND with a timeout of
# min(MAX, time left - RESERVE), or skip it (logged, recorded as "skipped: budget ...")
# when that limit is below MIN; record the exit status and the duration.
# STEP_SIGNAL=INT step ... stops a pytest run like Ctrl-C at the limit, so it still
# writes its JUnit XML / benchmark JSON for the tests that ran (default: TERM).
step() {
  local name=$1 max=$2 min=$3 sig=${STEP_SIGNAL:-TERM}
  shift 3
  local left limit
  left=$(remaining)
  limit=$((max < left - RESERVE ? max : left - RESERVE))
  echo
  echo "=================== [$name] limit ${limit}s (max ${max}s; ${left}s of the ${BUDGET}s budget left) $(date -u +%H:%M:%S)"
  if ((limit < min)); then
    echo "SKIPPED [$name]: only ${limit}s of the budget left, it needs at least ${min}s"
    record "$name" "skipped: budget (${limit}s left, needs ${min}s)" 0 "$limit"
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  timeout --signal="$sig" --kill-after=10 "$limit" "$@"
  rc=$?
  ((rc == 124 || rc == 137)) && echo "TIMED OUT after ${limit}s"
  record "$name" "$rc" $(($(date +%s) - t0)) "$limit"
  echo "----> [$name] rc=$rc in $(($(date +%s) - t0))s"
  return 0
}
skip_step() { echo; echo "=================== [$1] SKIPPED: $2"; record "$1" "skipped: $2" 0 0; }

echo "mage-kernels GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(hostname), budget ${BUDGET}s"
echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"

# ---------------------------------------------------------------- 1. environment
env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>/dev/null || echo "nvidia-smi: not found"
  nvidia-smi 2>/dev/null | head -15
  python - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
EOF
  (nvcc --version | tail -2) || echo "nvcc: not found"
  (cmake --version | head -1) || echo "cmake: not found"
  (compute-sanitizer --version | tail -1) || echo "compute-sanitizer: not found"
}
step environment 15 5 bash -c "$(declare -f env_info); env_info"

# ---------------------------------------------------------------- 2. build the extension; it loads, schemas match
# setup.py builds the extension only with a CUDA build of torch and a CUDA toolkit (torch's
# CUDA_HOME); without them a rebuild would just reinstall the pure-Python package: skipped.
TORCH_CUDA_HOME=$(python -c "import torch; from torch.utils.cpp_extension import CUDA_HOME; print((CUDA_HOME or '') if torch.version.cuda else '')" 2>/dev/null || true)
if [[ -n "$TORCH_CUDA_HOME" ]]; then
  step build_extension 150 30 python -m pip install --no-build-isolation --no-deps -v -e .
else
  skip_step build_extension "no CUDA build of torch with a CUDA toolkit here: the extension cannot be built"
fi
step extension_check 20 10 python - <<'EOF'
import sys
from mage_kernels import cuda_extension
mod = cuda_extension.load()
print("extension:", mod, "|", cuda_extension.why_unavailable())
print("ops:", cuda_extension.op_names())
problems = cuda_extension.schema_mismatches()
print("schema mismatches:", problems or "none")
sys.exit(0 if mod is not None and not problems else 1)
EOF

# ---------------------------------------------------------------- 3. whole test suite, compiled Triton
# Kernel tests first (pytest runs explicitly listed files in the given order), then every
# other tests/test_*.py. The report header names the device of the Triton tests; -rs lists
# every skip with its reason.
KERNEL_TESTS=(tests/test_lora_kernels.py tests/test_weight_grad_kernel.py tests/test_lora_op.py tests/test_fisher.py
  tests/test_pema.py tests/test_pema_foreach.py tests/test_fisher_reuse.py tests/test_cuda_backend.py)
SUITE=()
for f in "${KERNEL_TESTS[@]}"; do [[ -f "$f" ]] && SUITE+=("$f"); done
for f in tests/test_*.py; do [[ " ${SUITE[*]} " == *" $f "* ]] || SUITE+=("$f"); done
STEP_SIGNAL=INT step test_suite 200 30 python -m pytest -q -rs "${SUITE[@]}" --junitxml="$BASE.tests.xml"

# ---------------------------------------------------------------- 4. benchmarks
STEP_SIGNAL=INT step benchmarks 150 30 env MAGE_BENCH_RESULTS="$BASE.bench.md" python -m pytest -q bench --benchmark-only \
  --benchmark-json="$BASE.bench.json"

# ---------------------------------------------------------------- 5. CUDA backend tests (their own JUnit file)
STEP_SIGNAL=INT step cuda_backend_tests 60 15 python -m pytest -q -rs tests/test_cuda_backend.py tests/test_cuda_sources.py \
  --junitxml="$BASE.cuda_tests.xml"

# ---------------------------------------------------------------- 6. compute-sanitizer on the ops
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [[ -n "$SANITIZER" ]]; then
  # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees exact bounds.
  step sanitizer_memcheck_ops 90 30 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
    --error-exitcode 99 --target-processes all python bench/gpu_check_workload.py
else
  skip_step sanitizer "compute-sanitizer not found"
  step workload_without_sanitizer 30 10 python bench/gpu_check_workload.py
fi

# ---------------------------------------------------------------- 7. standalone CMake build + C++ test
CMAKE_BUILD="$ROOT/build/gpu-check-cmake"  # build/ is git-ignored
if command -v cmake >/dev/null; then
  CMAKE_ARCHS=$(echo "$MAGE_CUDA_ARCH" | sed 's/+PTX//g; s/\.//g; s/[ ,]/;/g')  # "8.0;9.0" -> "80;90"
  cmake_test() {
    cmake -S . -B "$CMAKE_BUILD" -DCMAKE_CUDA_ARCHITECTURES="$CMAKE_ARCHS" -DCMAKE_BUILD_TYPE=Release &&
      cmake --build "$CMAKE_BUILD" -j "$(nproc)" &&
      ctest --test-dir "$CMAKE_BUILD" --output-on-failure -V
  }
  step cmake_ctest 120 45 bash -c "$(declare -f cmake_test); CMAKE_BUILD='$CMAKE_BUILD' CMAKE_ARCHS='$CMAKE_ARCHS' cmake_test"
else
  skip_step cmake_ctest "cmake not found"
fi

# ---------------------------------------------------------------- 8. compute-sanitizer on the C++ test
if [[ -z "$SANITIZER" ]]; then
  skip_step sanitizer_cpp "compute-sanitizer not found"
elif [[ ! -x "$CMAKE_BUILD/test_mage_kernels" ]]; then
  skip_step sanitizer_cpp "the CMake test binary was not built"
else
  step sanitizer_memcheck_cpp 60 20 "$SANITIZER" --tool memcheck --error-exitcode 99 "$CMAKE_BUILD/test_mage_kernels"
  step sanitizer_racecheck_cpp 60 20 "$SANITIZER" --tool racecheck --error-exitcode 99 "$CMAKE_BUILD/test_mage_kernels"
fi

# ---------------------------------------------------------------- summary
python - "$BASE" "$STEPS" "$START" <<'EOF'
import json, os, platform, re, subprocess, sys, time
import xml.etree.ElementTree as ET

base, steps_file, start = sys.argv[1], sys.argv[2], int(sys.argv[3])

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {exc}"

env = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)), "python": platform.python_version(),
       "gpu": sh("nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader"),
       "nvcc": sh("nvcc --version | grep release"), "git_commit": sh("git rev-parse HEAD"),
       "mage_cuda_arch": os.environ.get("MAGE_CUDA_ARCH")}
try:
    import torch
    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
               device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as exc:  # noqa: BLE001
    env["torch"] = f"unavailable: {exc}"
try:
    import triton
    env["triton"] = triton.__version__
except Exception as exc:  # noqa: BLE001
    env["triton"] = f"unavailable: {exc}"

steps = []
for line in open(steps_file):
    name, rc, secs, limit = line.rstrip("\n").split("\t")
    steps.append({"step": name, "status": rc, "seconds": int(secs), "limit_s": int(limit)})

def junit(path):
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    out["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None][:50]
    return out

summary = {"environment": env, "steps": steps, "cuda_tests": junit(base + ".cuda_tests.xml"),
           "tests": junit(base + ".tests.xml"),
           "benchmark_json": base + ".bench.json" if os.path.exists(base + ".bench.json") else None,
           "total_seconds": int(time.time()) - start}
ok = all(s["status"] == "0" or s["status"].startswith("skipped") for s in steps)
summary["passed"] = ok
with open(base + ".json", "w") as f:
    json.dump(summary, f, indent=2)
print()
print("=================== summary")
for s in steps:
    print(f"{s['step']:<28} {s['status']:<28} {s['seconds']:>4}s")
for key in ("cuda_tests", "tests"):
    if summary[key]:
        print(key, {k: v for k, v in summary[key].items() if k != "failed"}, summary[key]["failed"][:10])
print("total", summary["total_seconds"], "s;", "PASSED" if ok else "FAILED", "->", base + ".json")
sys.exit(0 if ok else 1)
EOF
rc=$?
rm -f "$STEPS"
sleep 1  # let tee flush the log
exit $rc
