"""Builds mmfast._C: the CPU kernels always, the CUDA kernels when CUDA is here.

Environment switches:
  MMFAST_CUDA=0|1        force the CUDA kernels off or on (default: on when nvcc is
                         found and the installed torch is a CUDA build).
  TORCH_CUDA_ARCH_LIST   defaults to "8.0;9.0+PTX" when unset (torch's own default
                         needs a visible GPU and fails without one).
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-Wno-psabi", "-fvisibility=hidden"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def cuda_decision():
    """(build CUDA?, why) from MMFAST_CUDA, nvcc and the installed torch."""
    flag = os.environ.get("MMFAST_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"MMFAST_CUDA must be 0 or 1, got {flag!r}")
    nvcc = cpp_extension.CUDA_HOME and shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin"))
    nvcc = nvcc or shutil.which("nvcc")
    missing = []
    if not nvcc:
        missing.append("nvcc not found (set CUDA_HOME)")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if not rel("csrc/cuda/*.cu"):
        missing.append("no CUDA sources in csrc/cuda")
    if flag == "0":
        return False, "MMFAST_CUDA=0"
    if flag == "1" and missing:
        raise SystemExit("MMFAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    return (not missing), ("; ".join(missing) or "nvcc and a CUDA torch found")


def extension():
    cpu_sources = rel("csrc/module.cpp") + rel("csrc/args.cpp") + rel("csrc/cpu/*.cpp")
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


setup(
    packages=["mmfast", "mmfast.kernels"],
    package_dir={"mmfast": "mmfast", "mmfast.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
