#!/usr/bin/env bash
# `make gpu-check`: everything a GPU can tell us, in one command, on a bare offline GPU
# machine (its own python3 with torch, triton, pytest, ninja; nothing is installed,
# no venv is made, nothing is downloaded). From a fresh copy of the working tree:
#   1. build mmfast._C in place for the present GPU's arch only (ptxas -v in the log),
#   2. the test suite's GPU tests (tests/test_gpu.py: cuda and triton against the
#      reference) and the rest of the suite with CUDA visible,
#   3. CUDA-graph capture + replay of combine_ and of a whole MMPareto step,
#   4. compute-sanitizer (memcheck) on a small case, if it is installed,
#   5. bench/gpu.py's table.
# The log and the table go to $MMFAST_GPU_CHECK_DIR (default gpu-check/). Exit status:
# 0 all passed; 1 a step failed (a mismatch fails its step); 2 not everything could be
# checked (no nvcc: the CUDA kernels were not built). Without a GPU: SKIPPED, exit 0
# (MMFAST_GPU_CHECK_REQUIRE=1 makes that exit 1).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
dir=${MMFAST_GPU_CHECK_DIR:-gpu-check}
mkdir -p "$dir"
exec > >(tee "$dir/gpu-check.log") 2>&1
start=$(date +%s)
failed=()
step() { echo; echo "== gpu-check: $* ($(( $(date +%s) - start )) s)"; }
run() {  # run NAME CMD...: a failing step is recorded, the others still run
  local name=$1; shift
  if "$@"; then echo "-- $name: OK"; else local rc=$?; echo "-- $name: FAILED (exit $rc)"; failed+=("$name"); fi
}

step "environment"
$PY - <<'PY'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import triton; print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
PY
if ! arch=$($PY .ci/gpu_check.py arch); then
  echo "gpu-check: SKIPPED: $arch"
  [ "${MMFAST_GPU_CHECK_REQUIRE:-0}" = 1 ] && exit 1
  exit 0
fi
echo "arch: sm_${arch/./} (TORCH_CUDA_ARCH_LIST=$arch)"
optional=$($PY .ci/gpu_check.py optional)
[ -n "$optional" ] && echo "absent optional packages (their tests skip): $optional"

step "build (in place, sm_${arch/./} only)"
$PY .ci/gpu_check.py build > "$dir/build.log" 2>&1
rc=$?
grep -E "ptxas info|spill|registers|error" "$dir/build.log" | sed 's/^/   /' || true
if [ $rc = 1 ] || [ $rc -gt 2 ]; then echo "-- build: FAILED (see $dir/build.log)"; tail -30 "$dir/build.log"; exit 1; fi
[ $rc = 2 ] && { echo "-- build: CUDA kernels NOT built (no nvcc): the cuda backend is not checked"; failed+=("cuda-build"); }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import mmfast; print({k: (v.available or v.reason) for k, v in mmfast.backends().items()})"

step "tests on the GPU (cuda, triton vs the reference)"
run "tests/test_gpu.py" $PY -m pytest -q -p no:cacheprovider -x tests/test_gpu.py
step "the rest of the suite, CUDA visible"
run "test suite" $PY -m pytest -q -p no:cacheprovider --ignore=tests/test_gpu.py --ignore=tests/test_packaging.py tests

step "CUDA graphs: capture + replay with fresh data"
run "graphs" $PY .ci/gpu_check.py graphs

step "compute-sanitizer on a small case"
if command -v compute-sanitizer >/dev/null; then
  run "compute-sanitizer" compute-sanitizer --tool memcheck --error-exitcode 9 $PY .ci/gpu_check.py small
else
  echo "compute-sanitizer: not installed, skipped"
fi

step "bench/gpu.py"
run "bench/gpu.py" bash -c "$PY bench/gpu.py | tee '$dir/table.md'"

step "done in $(( $(date +%s) - start )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu-check: FAILED: ${failed[*]}"
  [ "${failed[*]}" = "cuda-build" ] && exit 2
  exit 1
fi
echo "gpu-check: OK (log and table in $dir/)"
