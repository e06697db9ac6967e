"""The benchmark scripts still run and still check their answers (smallest settings)."""
import os
import subprocess
import sys

import pytest

import mmfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not mmfast.backends()["cpu"].available, reason="cpu backend not built")


def run(*args):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_table_quick():
    out = run("bench/table.py", "--quick")
    assert "| resnet18-av | float32 | cpu |" in out and "| target |" in out


def test_step_gradients_agree():
    code = ("import sys; sys.path.insert(0, 'bench'); import step\n"
            "for m in ('mmpareto', 'dgl'): print(m, step.check_equal(m))")
    out = run("-c", code)
    assert "mmpareto" in out and "dgl" in out


def test_multi_k2():
    out = run("bench/multi.py", "--ks", "2", "--reps", "1", "--no-memory")
    assert "| 2 |" in out


def test_gpu_script_says_pending_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "pending a GPU run" in run("bench/gpu.py")
