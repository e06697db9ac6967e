"""`make gpu-check`'s logic, as far as a machine without a GPU can test it: arch detection
(with a faked capability), the skip paths, where the log goes, what the build compiles."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "gpu_check.sh")


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, ".ci", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "gpu_check.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize("cap,want", [("9.0", "9.0"), ("8.6", "8.6"), ("12.0", "12.0")])
def test_arch_from_faked_capability(cap, want):
    r = run("arch", env={"MMFAST_FAKE_CAPABILITY": cap})
    assert r.returncode == 0 and r.stdout.strip() == want


def test_arch_without_gpu_says_so():
    r = run("arch", env={"MMFAST_FAKE_NO_GPU": "1"})
    assert r.returncode == load().NO_GPU and "no usable CUDA device" in r.stdout


def test_build_sources_follow_the_tree():
    mod = load()
    cuda = [os.path.relpath(p, ROOT) for p in mod.sources(True)]
    cpu = [os.path.relpath(p, ROOT) for p in mod.sources(False)]
    assert "csrc/cuda/combine.cu" in cuda and "csrc/cuda_stub.cpp" not in cuda
    assert "csrc/cuda_stub.cpp" in cpu and not any(p.endswith(".cu") for p in cpu)
    assert "csrc/module.cpp" in cpu and "csrc/cpu/combine.cpp" in cpu


@pytest.mark.parametrize("require,code", [(None, 0), ("1", 1)])
def test_script_skips_without_gpu(tmp_path, require, code):
    env = {**os.environ, "MMFAST_FAKE_NO_GPU": "1", "MMFAST_GPU_CHECK_DIR": str(tmp_path / "out"), "PY": sys.executable}
    if require:
        env["MMFAST_GPU_CHECK_REQUIRE"] = require
    r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == code, r.stdout + r.stderr
    assert "gpu-check: SKIPPED" in r.stdout
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert "gpu-check: SKIPPED" in log and "torch" in log


def test_makefile_target_uses_the_script_and_machine_python():
    text = open(os.path.join(ROOT, "Makefile")).read()
    assert "gpu-check:" in text and ".ci/gpu_check.sh" in text
    script = open(SCRIPT).read()
    assert "venv" not in script.replace("no venv", "").replace("venv is made", "")  # the machine's python only
    assert "pip install" not in script
