"""Builds mmfast._C: the CPU kernels always, the CUDA kernels when CUDA is here.

Environment switches:
  MMFAST_CUDA=0|1        force the CUDA kernels off or on. Unset (the default): on when
                         nvcc is found (CUDA_HOME/bin or PATH), the installed torch is a
                         CUDA build and the two agree on the CUDA major version; else a
                         CPU-only build (never a failed install), and mmfast.backends()
                         says why "cuda" is unavailable. MMFAST_CUDA=1 turns a missing
                         piece into an error naming it.
  TORCH_CUDA_ARCH_LIST   defaults to "8.0;9.0+PTX" when unset (torch's own default
                         needs a visible GPU and fails without one).
  MMFAST_CXX_OPT         the C++ optimisation level, default -O3 (what users get). CI's
                         `make sdist-check` and `make cuda-check` build with -O1: they
                         check the package and the CUDA build, and -O3 compiles
                         csrc/cpu/kernels_multi.cpp about 10x slower (~2.5 min of one
                         core); `make test` checks the -O3 build.
"""
import glob
import os
import re
import shutil
import subprocess

import setuptools

# pyproject.toml's `license = "MIT"` (PEP 639) needs setuptools >= 77; older ones stop
# later with a schema error about `project.license`. A fresh Python 3.11 venv has 65.5.
if int(setuptools.__version__.split(".")[0]) < 77:
    raise SystemExit(
        f"mmfast needs setuptools>=77 to build, this environment has {setuptools.__version__}: "
        "run `python -m pip install -U 'setuptools>=77'` first (pip's --no-build-isolation "
        "builds with the environment's setuptools)."
    )

from setuptools import find_packages, setup  # noqa: E402

try:
    import torch
except ImportError:
    raise SystemExit(
        "mmfast compiles against the installed torch: install torch first (CPU or CUDA build, "
        "https://pytorch.org/get-started), then `pip install --no-build-isolation ...`."
    ) from None
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OPT = os.environ.get("MMFAST_CXX_OPT", "").strip() or "-O3"
if OPT not in ("-O0", "-O1", "-O2", "-O3", "-Os", "-Og"):
    raise SystemExit(f"MMFAST_CXX_OPT must be one of -O0 -O1 -O2 -O3 -Os -Og, got {OPT!r}")
CXX_FLAGS = [OPT, "-g0", "-fopenmp", "-Wno-psabi", "-fvisibility=hidden"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def nvcc_release(nvcc):
    """"12.8" from `nvcc --version`, or None if it cannot be run or read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_decision():
    """(build CUDA?, why) from MMFAST_CUDA, nvcc and the installed torch."""
    flag = os.environ.get("MMFAST_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"MMFAST_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False, "MMFAST_CUDA=0"
    nvcc = cpp_extension.CUDA_HOME and shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin"))
    nvcc = nvcc or shutil.which("nvcc")
    missing = []
    if not nvcc:
        missing.append("nvcc not found (set CUDA_HOME)")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    elif nvcc:
        # torch's build_ext refuses an nvcc whose major version differs from torch's CUDA.
        release = nvcc_release(nvcc)
        if release and release.split(".")[0] != torch.version.cuda.split(".")[0]:
            missing.append(f"nvcc {release} ({nvcc}) does not match torch's CUDA {torch.version.cuda}")
    if not rel("csrc/cuda/*.cu"):
        missing.append("no CUDA sources in csrc/cuda")
    if flag == "1" and missing:
        raise SystemExit("MMFAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    return (not missing), ("; ".join(missing) or "nvcc and a CUDA torch found")


# Compiled first: ninja starts jobs in source order, and kernels_multi.cpp (every K x dtype x
# instruction-set build of its loops, csrc/cpu/isa.h) takes longer than the others; begun
# after them, it made the whole build that much longer. None of these defines a static
# initializer, so the registrations (module.cpp, then the rest) keep their order.
SLOW_FIRST = ["csrc/cpu/kernels_multi.cpp", "csrc/cpu/kernels.cpp"]


def extension():
    cpu_sources = rel("csrc/module.cpp") + rel("csrc/args.cpp") + rel("csrc/cpu/*.cpp")
    cpu_sources = [s for s in SLOW_FIRST if s in cpu_sources] + [s for s in cpu_sources if s not in SLOW_FIRST]
    build_cuda, why = cuda_decision()
    print(f"mmfast: CUDA kernels {'ON' if build_cuda else 'OFF'} ({why})")
    if not build_cuda:
        return CppExtension(
            "mmfast._C",
            cpu_sources + ["csrc/cuda_stub.cpp"],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    # pip's CUDA torch ships the CUDA library headers (cusparse.h, ...) in nvidia/*/include,
    # which a bare toolkit (nvcc only) may lack.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    includes = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return CUDAExtension(
        "mmfast._C",
        cpu_sources + rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
        include_dirs=includes,
        extra_compile_args={"cxx": CXX_FLAGS + ["-DMMFAST_WITH_CUDA"], "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )


# mmfast and every subpackage of it (found, so new ones need no edit here), plus the
# top-level Triton kernels folder, installed as mmfast.kernels.
PACKAGES = find_packages(where=HERE, include=["mmfast", "mmfast.*"]) + ["mmfast.kernels"]

setup(
    packages=PACKAGES,
    package_dir={"mmfast": "mmfast", "mmfast.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
