#!/usr/bin/env bash
# Proves the CUDA extension builds, links and imports on a machine without a GPU,
# and that asking for it fails with a clear error. Skips (exit 0) without nvcc.
#
# MMFAST_CUDA_VENV=/path/to/venv reuses an existing venv holding a CUDA build of torch
# (for example /work/cuda-venv); otherwise .venv-cuda is created here (5.5 GB download).
# The extension is built in a temporary copy and imported from there: nothing is
# installed into the venv, so a shared one is left as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if ! command -v nvcc >/dev/null && [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda-check: SKIPPED (no nvcc on PATH or in $CUDA_HOME/bin)"
  exit 0
fi
export PATH="$CUDA_HOME/bin:$PATH"
venv=${MMFAST_CUDA_VENV:-.venv-cuda}
if [ -n "${MMFAST_CUDA_VENV:-}" ]; then
  [ -x "$venv/bin/python" ] || { echo "cuda-check: MMFAST_CUDA_VENV=$venv has no bin/python" >&2; exit 1; }
elif [ ! -f "$venv/.ready" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.14.1 numpy ninja setuptools wheel
  touch "$venv/.ready"
fi
# --venv-only: just the venv (.ci/run fetches it while the CPU build and tests run).
if [ "${1:-}" = "--venv-only" ]; then
  echo "cuda-check: venv $venv ready"
  exit 0
fi
py=$(cd "$venv" && pwd)/bin/python
# Build from a copy, so the CPU build in the working tree is left alone.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -r csrc mmfast kernels setup.py pyproject.toml README.md "$src"/
rm -f "$src"/mmfast/_C*.so
# -O1 for the C++ files: this checks that the CUDA build compiles, links and imports; the
# -O3 CPU kernels are built and tested by `make test` (at -O3 the CPU loops alone take
# minutes more). MMFAST_CXX_OPT=-O3 make cuda-check builds what a user gets.
(cd "$src" && MMFAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"} \
  MMFAST_CXX_OPT=${MMFAST_CXX_OPT:--O1} "$py" setup.py -q build_ext --inplace)
ln -s ../kernels "$src/mmfast/kernels"  # setup.py maps mmfast.kernels to kernels/
cd "$src" && PYTHONPATH="$src" PYTHONNOUSERSITE=1 "$py" - <<'PY'
import torch
import mmfast
from mmfast.ops._backends import _C

assert mmfast.__file__.startswith(__import__("os").getcwd()), mmfast.__file__
assert torch.version.cuda, "the cuda-check venv must hold a CUDA build of torch"
assert _C.cuda_built(), "mmfast._C was built without its CUDA kernels"
for op in ("mmfast::combine_", "mmfast::clip_", "mmfast::gram_k", "mmfast::combine_k_", "mmfast::aggregate_k_",
           "mmfast::weighting", "mmfast::aggregate_weights"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
info = mmfast.backends()["cuda"]
if torch.cuda.is_available():
    print("cuda-check: a GPU is visible; the CUDA tests run in the test suite")
else:
    assert not info.available and "no CUDA device" in info.reason, info
    try:
        mmfast.combine_([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], backend="cuda")
    except RuntimeError as e:
        assert "no CUDA device" in str(e), e
    else:
        raise AssertionError("backend='cuda' without a GPU did not raise")
a = [torch.randn(10)]
mmfast.combine_([torch.empty(10)], a, a)  # the CPU kernels of the same build still work
print(f"cuda-check: OK (torch {torch.__version__}, CUDA kernels built and registered; {info.reason or 'GPU present'})")
PY
