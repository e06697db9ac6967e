"""Packaging: the sdist carries every build source and nothing else, setup.py's CUDA switch
never fails an install without nvcc, one version, truthful extras.

The installed package itself is checked by `make sdist-check` (.ci/sdist_check.sh): sdist,
wheel, fresh venv outside the checkout, .ci/smoke_installed.py there.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import setuptools
import torch

import mmfast

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "setup.py")
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def git_files():
    """Files a clone would have after a commit: tracked (and still present) plus untracked-not-ignored."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout: the file list to compare with is unknown")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return {f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(member names relative to the archive's top folder, PKG-INFO text) of an sdist built
    from this checkout as it is, build outputs (mmfast/_C*.so, build/, .venv) included, so
    the MANIFEST.in exclusions are exercised. --egg-base keeps a stale in-tree egg-info out."""
    tmp = tmp_path_factory.mktemp("sdist")
    res = subprocess.run([sys.executable, SETUP, "-q", "egg_info", "--egg-base", str(tmp), "sdist",
                          "--dist-dir", str(tmp)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (archive,) = tmp.glob("mmfast-*.tar.gz")
    with tarfile.open(archive) as tar:
        top = f"mmfast-{mmfast.__version__}/"
        members = [m for m in tar.getmembers() if m.isfile()]
        assert all(m.name.startswith(top) for m in members), [m.name for m in members][:5]
        pkg_info = tar.extractfile(top + "PKG-INFO").read().decode()
        return {m.name[len(top):] for m in members}, pkg_info


def test_sdist_carries_every_build_source(sdist):
    names, _ = sdist
    needed = {f for f in git_files() if f.split("/")[0] in ("csrc", "kernels", "mmfast")}
    needed |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"}
    assert any(f.endswith(".h") for f in needed) and any(f.endswith(".cu") for f in needed)
    missing = sorted(needed - names)
    assert not missing, f"missing from the sdist (MANIFEST.in?): {missing}"


def test_sdist_carries_nothing_else(sdist):
    names, _ = sdist
    generated = {"PKG-INFO", "setup.cfg"}
    extra = sorted(n for n in names - git_files() - generated if not n.startswith("mmfast.egg-info/"))
    assert not extra, f"in the sdist but not sources of the checkout: {extra}"
    # tests/bench/examples (and testbed/, their models) need the whole checkout; half of
    # them would only mislead
    unwanted = sorted(n for n in names if n.split("/")[0] in ("tests", "bench", "examples", "testbed", ".ci")
                      or n.endswith((".so", ".o", ".pyc")))
    assert not unwanted, unwanted


def test_sdist_metadata(sdist):
    _, pkg_info = sdist
    field = lambda name: re.findall(rf"^{name}: (.*)$", pkg_info, flags=re.M)  # noqa: E731
    assert field("Version") == [mmfast.__version__]
    assert field("License-Expression") == ["MIT"]
    assert field("License-File") == ["LICENSE"]
    assert set(field("Provides-Extra")) == {"test", "bench"}
    assert "torch>=2.4" in field("Requires-Dist")


def test_version_has_one_source():
    from mmfast import _version

    assert mmfast.__version__ == _version.__version__
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mmfast._version.__version__"}
    hits = [f for f in git_files() if f.endswith((".py", ".toml", ".cfg"))
            and re.search(r"""__version__\s*=\s*["']""", open(os.path.join(ROOT, f)).read())]
    assert hits == ["mmfast/_version.py"], hits


def test_license_file():
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the mmfast authors" in text
    assert PYPROJECT["project"]["license"] == "MIT" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]  # PEP 639 `license = "MIT"`


# ------------------------------------------------------------------ setup.py's CUDA switch


@pytest.fixture
def run_setup(monkeypatch):
    """Runs setup.py in this process with setuptools.setup replaced: returns (its globals,
    the keyword arguments it passed to setup). Env and torch attributes come from monkeypatch."""

    def run():
        captured = {}
        monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
        import runpy

        return runpy.run_path(SETUP, run_name="setup_under_test"), captured

    monkeypatch.delenv("MMFAST_CUDA", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)  # a CUDA build sets its default
    monkeypatch.delenv("MMFAST_CXX_OPT", raising=False)
    return run


def fake_nvcc(tmp_path, release):
    """A folder with an `nvcc` that reports `release`, for CUDA_HOME."""
    bin_ = tmp_path / "cuda" / "bin"
    bin_.mkdir(parents=True)
    nvcc = bin_ / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(0o755)
    return str(tmp_path / "cuda")


def no_nvcc(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "nowhere"))
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no nvcc on it


def test_setup_without_nvcc_builds_cpu_only(run_setup, monkeypatch, tmp_path, capsys):
    no_nvcc(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # even a CUDA torch: no nvcc, no CUDA build
    g, kw = run_setup()
    assert g["cuda_decision"]() == (False, "nvcc not found (set CUDA_HOME)")
    (ext,) = kw["ext_modules"]
    assert "csrc/cuda_stub.cpp" in ext.sources and not any(s.endswith(".cu") for s in ext.sources)
    assert {"csrc/module.cpp", "csrc/cpu/kernels.cpp"} <= set(ext.sources)
    assert "mmfast: CUDA kernels OFF (nvcc not found" in capsys.readouterr().out


def test_setup_cpu_torch_with_nvcc_builds_cpu_only(run_setup, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", fake_nvcc(tmp_path, "13.0"))
    monkeypatch.setattr(torch.version, "cuda", None)
    g, _ = run_setup()
    build, why = g["cuda_decision"]()
    assert not build and "is not a CUDA build" in why


@pytest.mark.parametrize("torch_cuda,build", [("13.0", True), ("13.2", True), ("12.8", False)])
def test_setup_cuda_torch_needs_a_matching_nvcc(run_setup, monkeypatch, tmp_path, torch_cuda, build):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", fake_nvcc(tmp_path, "13.0"))
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    g, _ = run_setup()
    decision, why = g["cuda_decision"]()
    assert decision == build, why
    if not build:  # torch's build_ext would refuse it: a CPU-only build, with the reason
        assert f"nvcc 13.0 ({tmp_path}/cuda/bin/nvcc) does not match torch's CUDA 12.8" == why


def test_setup_cuda_switch(run_setup, monkeypatch, tmp_path):
    no_nvcc(monkeypatch, tmp_path)
    g, _ = run_setup()
    monkeypatch.setenv("MMFAST_CUDA", "0")
    assert g["cuda_decision"]() == (False, "MMFAST_CUDA=0")
    monkeypatch.setenv("MMFAST_CUDA", "1")  # asked for, cannot: an error naming what is missing
    with pytest.raises(SystemExit, match="MMFAST_CUDA=1 but the CUDA kernels cannot be built: nvcc not found"):
        g["cuda_decision"]()
    monkeypatch.setenv("MMFAST_CUDA", "yes")
    with pytest.raises(SystemExit, match="MMFAST_CUDA must be 0 or 1, got 'yes'"):
        g["cuda_decision"]()


def test_setup_names_old_setuptools(run_setup, monkeypatch):
    monkeypatch.setattr(setuptools, "__version__", "65.5.0")  # what a fresh Python 3.11 venv has
    with pytest.raises(SystemExit, match=r"needs setuptools>=77 .* has 65\.5\.0: run `python -m pip install -U"):
        run_setup()


def test_setup_packages(run_setup):
    _, kw = run_setup()
    assert kw["package_dir"] == {"mmfast": "mmfast", "mmfast.kernels": "kernels"}
    subpackages = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "mmfast"))
                   if "__init__.py" in files}
    assert set(kw["packages"]) == subpackages | {"mmfast.kernels"}


def test_setup_py_runs_without_nvcc(tmp_path):
    """End to end, in a fresh process: no nvcc anywhere, a CPU torch, no MMFAST_CUDA."""
    env = {k: v for k, v in os.environ.items() if k != "MMFAST_CUDA"}
    env.update(CUDA_HOME=str(tmp_path / "nowhere"), PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin")
    if shutil.which("nvcc", path=env["PATH"]):
        pytest.skip("nvcc is on /usr/bin or /bin here")
    res = subprocess.run([sys.executable, SETUP, "--name"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mmfast: CUDA kernels OFF (nvcc not found" in res.stdout and res.stdout.strip().endswith("mmfast")


# ------------------------------------------------------------------ extras


def local_module(dotted, search):
    """The file of a local module or package (``step``, ``testbed.models``) in the first of
    the `search` folders that has it, or None. mmfast itself is not followed."""
    if dotted.split(".")[0] == "mmfast":
        return None
    for d in search:
        base = os.path.join(d, *dotted.split("."))
        for path in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(path):
                return path
    return None


def imported_modules(folder, search):
    """Top-level names of the modules that folder's .py files import (import statements and
    pytest.importorskip), following imports of local modules and packages found in
    `search` folders."""
    todo = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")]
    seen, names = set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                found = [node.args[0].value]
            else:
                continue
            for dotted in found:
                local = local_module(dotted, search) or local_module(dotted.split(".")[0], search)
                if local:
                    todo.append(local)
                else:
                    names.add(dotted.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "torch", "mmfast"}


def uses_fixture(folder, fixture):
    return any(fixture in [a.arg for a in node.args.args]
               for f in os.listdir(folder) if f.startswith("test_") and f.endswith(".py")
               for node in ast.walk(ast.parse(open(os.path.join(folder, f)).read()))
               if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"))


def requirement_names(extra):
    return {re.split(r"[\s\[<>=;!~]", r, maxsplit=1)[0].lower().replace("-", "_")
            for r in PYPROJECT["project"]["optional-dependencies"][extra]}


@pytest.mark.parametrize("extra,folder,search", [("test", "tests", ["tests", "."]), ("bench", "bench", ["bench", "tests", "."])])
def test_extras_name_what_is_imported(extra, folder, search):
    """The extra lists exactly the third-party packages the folder needs: what it imports,
    pytest-benchmark if it uses the `benchmark` fixture, triton if it runs the Triton backend
    (mmfast.kernels imports it), and nothing more."""
    folder = os.path.join(ROOT, folder)
    needed = imported_modules(folder, [os.path.join(ROOT, s) for s in search])
    if uses_fixture(folder, "benchmark"):
        needed.add("pytest_benchmark")
    if any('"triton"' in open(os.path.join(folder, f)).read() for f in os.listdir(folder) if f.endswith(".py")):
        needed.add("triton")
    assert requirement_names(extra) == needed


def test_setup_optimisation_level(run_setup, monkeypatch, tmp_path):
    no_nvcc(monkeypatch, tmp_path)
    _, kw = run_setup()  # users get -O3
    assert kw["ext_modules"][0].extra_compile_args["cxx"][0] == "-O3"
    monkeypatch.setenv("MMFAST_CXX_OPT", "-O1")  # what make sdist-check builds with
    _, kw = run_setup()
    assert kw["ext_modules"][0].extra_compile_args["cxx"][0] == "-O1"
    monkeypatch.setenv("MMFAST_CXX_OPT", "-O9")
    with pytest.raises(SystemExit, match="MMFAST_CXX_OPT must be one of"):
        run_setup()
