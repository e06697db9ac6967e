"""Which backends exist in this process, and why the others do not."""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import NamedTuple

import torch

BACKENDS = ("cpu", "cuda", "triton", "foreach", "torch")


class BackendInfo(NamedTuple):
    available: bool
    reason: str  # empty when available


def _load_extension():
    try:
        from .. import _C  # noqa: F401  (registers the mmfast::combine_ kernels)
    except ImportError as e:
        if "MMFAST_CPU_ISA" in repr(e) + repr(e.__cause__):  # asked for by name: no silent fallback
            raise
        return None, f"the C++ extension mmfast._C is not built or failed to load ({e})"
    return _C, ""


_C, _C_REASON = _load_extension()
if _C is None:
    warnings.warn(
        f"mmfast: {_C_REASON}; falling back to the pure-PyTorch backends. "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


_CUDA_BUILT = bool(_C is not None and _C.cuda_built())  # asked once: pybind calls do not trace
# Asked once too: find_spec walks sys.path, which cost ~40 us on every combine_ call.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_reason() -> str:
    """Empty when the Triton backend can run here: a GPU, or the interpreter for CPU tensors."""
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU tensors)"
    return ""


_INFO: dict = {}  # TRITON_INTERPRET's value -> backends(): asked on every combine_ call, it cost ~30 us


def backends() -> dict:
    """``{name: BackendInfo(available, reason)}`` for every backend name."""
    key = os.environ.get("TRITON_INTERPRET")
    info = _INFO.get(key)
    if info is None:
        info = _INFO[key] = _backends()
    return dict(info)


def _backends() -> dict:
    cpu = BackendInfo(_C is not None, _C_REASON)
    if _C is None:
        cuda = BackendInfo(False, _C_REASON)
    elif not _CUDA_BUILT:
        cuda = BackendInfo(False, "mmfast._C was built without CUDA (no nvcc or a CPU-only torch at build time)")
    elif not torch.cuda.is_available():
        cuda = BackendInfo(False, "no CUDA device is visible")
    else:
        cuda = BackendInfo(True, "")
    reason = _triton_reason()
    return {
        "cpu": cpu,
        "cuda": cuda,
        "triton": BackendInfo(not reason, reason),
        "foreach": BackendInfo(True, ""),
        "torch": BackendInfo(True, ""),
    }


def select_backend(name: str | None, device: torch.device) -> str:
    """The backend to run on tensors of ``device``: ``name`` checked, or the best one."""
    info = backends()
    if name is None:
        order = ("cpu", "foreach") if device.type == "cpu" else ("cuda", "triton", "foreach")
        return next(b for b in order if info[b].available)
    if name not in info:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))} or None, got {name!r}")
    if not info[name].available:
        raise RuntimeError(f"backend={name!r} is not available: {info[name].reason}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device}")
    return name
