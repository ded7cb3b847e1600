#!/usr/bin/env bash
# One-command GPU verification of mage-kernels: headline benchmarks first, then tests (< 8 minutes).
#
#   bash bench/gpu_check.sh
#
# Every step runs under `timeout` with a limit of min(its own maximum, what is left of the
# global budget $MAGE_GPU_CHECK_BUDGET (default 470 s) minus a reserve for the kill grace and
# the summary); a step whose limit would fall below its minimum useful time is skipped, with a
# log line. No step runs twice (each test file is in exactly one step). Steps, most valuable first:
#   1. preflight: CUDA torch, triton, pytest-benchmark, the GPU; stops the run (exit 2) when one
#      is missing                                                                        (max  30 s)
#   2. headline benchmarks, one process, interleaved repeats, ratios from the same run
#      (bench/headline.py: MageLinear vs the cuBLAS floor, vs PEFT's four adapters and
#      torch.compile of the eager loop, cuBLAS vs Triton concat-K, the base GEMM alone,
#      PEMA bandwidth vs copy (eager and CUDA graph), Fisher overhead T=512 and T=1)    (max 230 s)
#   3. kernel and op tests with COMPILED Triton on CUDA tensors (TRITON_INTERPRET=0;
#      MAGE_REQUIRE_CUDA_TESTS=1 makes pytest refuse to start if they would run on CPU) (max 110 s)
#   4. build the CUDA extension in place and check its op schemas (MAGE_CUDA_ARCH,
#      default 9.0)                                                                     (max 100 s)
#   5. the CUDA backend tests (tests/test_cuda_backend.py)                              (max  40 s)
#   6. every other test file                                                            (what is left)
#   7. compute-sanitizer memcheck of the CUDA extension's ops                           (what is left)
# Results: $OUT (when set, e.g. by a remote runner) or bench/results/gpu_check_<date>_<gpu>/:
#   gpu_check.log, gpu_check.json (environment, per-step status/duration, test summaries),
#   headline.json / headline.md, the pytest JUnit XML files.
# Exit status: 0 when every step that ran passed (a step skipped because its tool is missing or
# the budget ran out does not fail the run), 1 otherwise, 2 when the preflight failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

BUDGET=${MAGE_GPU_CHECK_BUDGET:-470}
RESERVE=10  # kept free at every step: `timeout --kill-after=5` grace + the final summary
START=$(date +%s)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
GPU_NAME=$( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo no-gpu) | head -1)
GPU_TAG=$(echo "$GPU_NAME" | tr -c 'A-Za-z0-9\n' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
RESULTS=${OUT:-$ROOT/bench/results/gpu_check_${STAMP}_${GPU_TAG}}
mkdir -p "$RESULTS"
BASE="$RESULTS/gpu_check"
LOG="$BASE.log"
STEPS="$BASE.steps.tsv"
: >"$STEPS"
exec > >(tee -a "$LOG") 2>&1

export TRITON_INTERPRET=0             # compiled Triton; tests/conftest.py only sets it when unset
export MAGE_REQUIRE_CUDA_TESTS=1      # tests/conftest.py: refuse to run the Triton tests on CPU tensors
export MAGE_REQUIRE_CUDA_EXTENSION=1  # tests/test_cuda_backend.py: a missing GPU/extension fails, not skips
export MAGE_CUDA_ARCH=${MAGE_CUDA_ARCH:-9.0}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export PYTHONUNBUFFERED=1

remaining() { echo $((START + BUDGET - $(date +%s))); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; }

# step NAME MAX_SECONDS MIN_SECONDS COMMAND...: run COMMAND with a timeout of
# min(MAX, time left - RESERVE), or skip it (logged, recorded as "skipped: budget ...")
# when that limit is below MIN; record the exit status and the duration (LAST_RC).
# STEP_SIGNAL=INT step ... stops a pytest run like Ctrl-C at the limit, so it still
# writes its JUnit XML for the tests that ran (default: TERM).
LAST_RC=0
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
    LAST_RC=0
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  timeout --signal="$sig" --kill-after=5 "$limit" "$@"
  rc=$?
  ((rc == 124 || rc == 137)) && echo "TIMED OUT after ${limit}s"
  record "$name" "$rc" $(($(date +%s) - t0)) "$limit"
  echo "----> [$name] rc=$rc in $(($(date +%s) - t0))s"
  LAST_RC=$rc
  return 0
}
skip_step() { echo; echo "=================== [$1] SKIPPED: $2"; record "$1" "skipped: $2" 0 0; }

echo "mage-kernels GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(hostname), budget ${BUDGET}s"
echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"

# ---------------------------------------------------------------- 1. preflight
preflight() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>/dev/null || echo "nvidia-smi: not found"
  (nvcc --version | tail -1) 2>/dev/null || echo "nvcc: not found (the extension steps are skipped)"
  python - <<'EOF'
import platform, sys
problems = []
try:
    import torch
    print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda)
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    elif not torch.cuda.is_available():
        problems.append("torch.cuda.is_available() is False (no GPU visible)")
    else:
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
              round(p.total_memory / 2**30, 1), "GiB")
except Exception as exc:  # noqa: BLE001
    problems.append(f"torch does not import: {exc}")
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:  # noqa: BLE001
    problems.append(f"triton does not import: {exc}")
try:
    import pytest_benchmark
    print("pytest-benchmark", pytest_benchmark.__version__)
except Exception as exc:  # noqa: BLE001
    problems.append(f"pytest-benchmark does not import: {exc} (pip install pytest-benchmark)")
for p in problems:
    print("PREFLIGHT FAILED:", p)
sys.exit(1 if problems else 0)
EOF
}
step preflight 30 5 bash -c "$(declare -f preflight); preflight"
if ((LAST_RC != 0)); then
  echo "gpu_check: error: the preflight failed (see above); nothing else was run"
  rm -f "$STEPS"
  exit 2
fi

# ---------------------------------------------------------------- 2. headline benchmarks
step headline_benchmarks 230 60 python bench/headline.py --size gpu --out "$RESULTS"

# ---------------------------------------------------------------- 3. kernel and op tests, compiled Triton
KERNEL_TESTS=(tests/test_lora_kernels.py tests/test_weight_grad_kernel.py tests/test_lora_op.py tests/test_layer.py
  tests/test_pema.py tests/test_pema_plan.py tests/test_pema_foreach.py tests/test_fisher.py tests/test_fisher_reuse.py)
STEP_SIGNAL=INT step kernel_tests 110 30 python -m pytest -q -rs -p no:cacheprovider "${KERNEL_TESTS[@]}" \
  --junitxml="$BASE.kernel_tests.xml"

# ---------------------------------------------------------------- 4./5. the CUDA extension and its tests
TORCH_CUDA_HOME=$(python -c "import torch; from torch.utils.cpp_extension import CUDA_HOME; print((CUDA_HOME or '') if torch.version.cuda else '')" 2>/dev/null || true)
if [[ -n "$TORCH_CUDA_HOME" ]] && command -v nvcc >/dev/null; then
  build_and_check() {
    python -m pip install --no-build-isolation --no-deps -q -e . && python - <<'EOF'
import sys
from mage_kernels import cuda_extension
mod = cuda_extension.load()
print("extension:", mod, "|", cuda_extension.why_unavailable(), "| ops:", cuda_extension.op_names())
problems = cuda_extension.schema_mismatches()
print("schema mismatches:", problems or "none")
sys.exit(0 if mod is not None and not problems else 1)
EOF
  }
  step build_extension 100 40 bash -c "$(declare -f build_and_check); build_and_check"
  STEP_SIGNAL=INT step cuda_backend_tests 40 10 python -m pytest -q -rs -p no:cacheprovider tests/test_cuda_backend.py \
    --junitxml="$BASE.cuda_tests.xml"
else
  skip_step build_extension "no CUDA build of torch with a CUDA toolkit (nvcc) here: the extension cannot be built"
  skip_step cuda_backend_tests "the extension is not built"
fi

# ---------------------------------------------------------------- 6. every other test file
OTHER_TESTS=()
for f in tests/test_*.py; do
  [[ " ${KERNEL_TESTS[*]} tests/test_cuda_backend.py " == *" $f "* ]] || OTHER_TESTS+=("$f")
done
STEP_SIGNAL=INT step other_tests 600 20 python -m pytest -q -rs -p no:cacheprovider "${OTHER_TESTS[@]}" \
  --junitxml="$BASE.other_tests.xml"

# ---------------------------------------------------------------- 7. compute-sanitizer on the extension's ops
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [[ -z "$SANITIZER" ]]; then
  skip_step sanitizer_memcheck_ops "compute-sanitizer not found"
elif ! python -c "import sys; from mage_kernels import cuda_extension; sys.exit(cuda_extension.load() is None)"; then
  skip_step sanitizer_memcheck_ops "the extension is not built"
else
  # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees exact bounds.
  step sanitizer_memcheck_ops 90 30 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
    --error-exitcode 99 --target-processes all python bench/gpu_check_workload.py
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

results_dir = os.path.dirname(base)
summary = {"environment": env, "steps": steps, "kernel_tests": junit(base + ".kernel_tests.xml"),
           "cuda_tests": junit(base + ".cuda_tests.xml"), "other_tests": junit(base + ".other_tests.xml"),
           "headline": os.path.join(results_dir, "headline.json")
           if os.path.exists(os.path.join(results_dir, "headline.json")) else None,
           "total_seconds": int(time.time()) - start}
ok = all(s["status"] == "0" or s["status"].startswith("skipped") for s in steps)
summary["passed"] = ok
with open(base + ".json", "w") as f:
    json.dump(summary, f, indent=2)
print()
print("=================== summary")
for s in steps:
    print(f"{s['step']:<28} {s['status']:<28} {s['seconds']:>4}s")
for key in ("kernel_tests", "cuda_tests", "other_tests"):
    if summary[key]:
        print(key, {k: v for k, v in summary[key].items() if k != "failed"}, summary[key]["failed"][:10])
print("total", summary["total_seconds"], "s;", "PASSED" if ok else "FAILED", "->", base + ".json")
sys.exit(0 if ok else 1)
EOF
rc=$?
rm -f "$STEPS"
sleep 1  # let tee flush the log
exit $rc
