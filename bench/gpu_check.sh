#!/usr/bin/env bash
# One-command verification of mage-kernels on a CUDA GPU machine (finishes in < 10 minutes).
#
#   bash bench/gpu_check.sh
#
# Steps (each bounded by `timeout`, all within a global budget of
# $MAGE_GPU_CHECK_BUDGET seconds, default 560):
#   1. environment: date, GPU, driver, CUDA, torch, triton, nvcc, cmake, compute-sanitizer;
#   2. build the CUDA extension in place (MAGE_CUDA_ARCH, default 9.0 to save time);
#   3. check it loads and its op schemas equal the Python ops';
#   4. the CUDA backend tests with compiled Triton (TRITON_INTERPRET=0);
#   5. the standalone CMake build and its C++ parity test (ctest);
#   6. compute-sanitizer memcheck of the ops (Python workload) and memcheck/racecheck of the C++ test;
#   7. the whole test suite with CUDA enabled;
#   8. the benchmark suites (pytest bench --benchmark-only).
# Results: $OUT (when set, e.g. by a remote runner) or bench/results/, as
#   gpu_check_<date>_<gpu>.log   everything printed
#   gpu_check_<date>_<gpu>.json  environment, per-step status/duration, test summaries
# plus the pytest JUnit XML files, the benchmark JSON and Markdown table.
# Exit status: 0 when every step that ran passed (a step skipped because its tool
# is missing does not fail the run), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

BUDGET=${MAGE_GPU_CHECK_BUDGET:-560}
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

export TRITON_INTERPRET=0             # tests/conftest.py only sets it when unset
export MAGE_REQUIRE_CUDA_EXTENSION=1  # tests/test_cuda_backend.py: a missing GPU/extension fails, not skips
export MAGE_CUDA_ARCH=${MAGE_CUDA_ARCH:-9.0}
export PYTHONUNBUFFERED=1

remaining() { echo $((START + BUDGET - $(date +%s))); }

# step NAME MAX_SECONDS COMMAND...: run with a timeout of min(MAX, time left), record rc and duration.
step() {
  local name=$1 max=$2
  shift 2
  local left
  left=$(remaining)
  local limit=$((max < left - 5 ? max : left - 5))
  echo
  echo "=================== [$name] (limit ${limit}s) $(date -u +%H:%M:%S)"
  if ((limit < 10)); then
    echo "SKIPPED: time budget exhausted"
    printf '%s\t%s\t%s\t%s\n' "$name" "budget" 0 "$limit" >>"$STEPS"
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  ((rc == 124 || rc == 137)) && echo "TIMED OUT after ${limit}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $(($(date +%s) - t0)) "$limit" >>"$STEPS"
  echo "----> [$name] rc=$rc in $(($(date +%s) - t0))s"
  return 0
}
skip_step() { echo; echo "=================== [$1] SKIPPED: $2"; printf '%s\t%s\t%s\t%s\n' "$1" "skipped: $2" 0 0 >>"$STEPS"; }

echo "mage-kernels GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(hostname)"
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
step environment 60 bash -c "$(declare -f env_info); env_info"

# ---------------------------------------------------------------- 2. build the extension
step build_extension 300 python -m pip install --no-build-isolation --no-deps -v -e .

# ---------------------------------------------------------------- 3. it loads, schemas match
step extension_check 60 python - <<'EOF'
import sys
from mage_kernels import cuda_extension
mod = cuda_extension.load()
print("extension:", mod, "|", cuda_extension.why_unavailable())
print("ops:", cuda_extension.op_names())
problems = cuda_extension.schema_mismatches()
print("schema mismatches:", problems or "none")
sys.exit(0 if mod is not None and not problems else 1)
EOF

# ---------------------------------------------------------------- 4. CUDA backend tests first
step cuda_backend_tests 150 python -m pytest -q -rs tests/test_cuda_backend.py tests/test_cuda_sources.py \
  --junitxml="$BASE.cuda_tests.xml"

# ---------------------------------------------------------------- 5. standalone CMake build + C++ test
CMAKE_BUILD="$ROOT/build/gpu-check-cmake"  # build/ is git-ignored
if command -v cmake >/dev/null; then
  CMAKE_ARCHS=$(echo "$MAGE_CUDA_ARCH" | sed 's/+PTX//g; s/\.//g; s/[ ,]/;/g')  # "8.0;9.0" -> "80;90"
  cmake_test() {
    cmake -S . -B "$CMAKE_BUILD" -DCMAKE_CUDA_ARCHITECTURES="$CMAKE_ARCHS" -DCMAKE_BUILD_TYPE=Release &&
      cmake --build "$CMAKE_BUILD" -j "$(nproc)" &&
      ctest --test-dir "$CMAKE_BUILD" --output-on-failure -V
  }
  step cmake_ctest 150 bash -c "$(declare -f cmake_test); CMAKE_BUILD='$CMAKE_BUILD' CMAKE_ARCHS='$CMAKE_ARCHS' cmake_test"
else
  skip_step cmake_ctest "cmake not found"
fi

# ---------------------------------------------------------------- 6. compute-sanitizer
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [[ -n "$SANITIZER" ]]; then
  # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees exact bounds.
  step sanitizer_memcheck_ops 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
    --error-exitcode 99 --target-processes all python bench/gpu_check_workload.py
  if [[ -x "$CMAKE_BUILD/test_mage_kernels" ]]; then
    step sanitizer_memcheck_cpp 60 "$SANITIZER" --tool memcheck --error-exitcode 99 "$CMAKE_BUILD/test_mage_kernels"
    step sanitizer_racecheck_cpp 90 "$SANITIZER" --tool racecheck --error-exitcode 99 "$CMAKE_BUILD/test_mage_kernels"
  else
    skip_step sanitizer_cpp "the CMake test binary was not built"
  fi
else
  skip_step sanitizer "compute-sanitizer not found"
  step workload_without_sanitizer 60 python bench/gpu_check_workload.py
fi

# ---------------------------------------------------------------- 7. whole test suite
step test_suite 200 python -m pytest -q -rs tests --junitxml="$BASE.tests.xml"

# ---------------------------------------------------------------- 8. benchmarks
step benchmarks 200 env MAGE_BENCH_RESULTS="$BASE.bench.md" python -m pytest -q bench --benchmark-only \
  --benchmark-json="$BASE.bench.json"

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
