"""The argument contract of ``combine_``, ``aggregate_`` and ``clip_grad_norm_``, one for
every backend.

The tensor checks (dtype, device, shape, contiguity, inference tensors, memory overlap
across every index) and the group-id values are checked in C++ (``csrc/args.cpp``): by
the operators themselves on the ``cpu`` and ``cuda`` backends, through
``mmfast._C.check_args`` on the others. Python does O(1) work per call apart from
building the lists and one C-level pass over the group ids' types. ``_check_py`` below is
the same contract in Python, with the same messages, for builds without the extension
and to word the error when an element is not even a tensor (tests/test_args.py
compares the two).
"""
from __future__ import annotations

import bisect
import math
import numbers
from typing import NamedTuple

import torch

METHODS = ("mmpareto", "dgl", "sum")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OUTSIDE = -1  # group id of a tensor outside every group


class CombineArgs(NamedTuple):
    out: list
    grads_mm: list
    grads_uni: list
    method: str
    groups: list  # one int per tensor, OUTSIDE or 0..num_groups-1
    num_groups: int
    fusion: list  # one bool per tensor
    gamma: float
    alpha: float
    max_norm: float | None


def tensor_list(name: str, value) -> list:
    """``value`` as a list (a tensor is a list of one); its elements are checked later."""
    if type(value) is list:
        return value
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(value).__name__}")


_tensor_list = tensor_list  # the name other modules imported


def id_list(name: str, value, n: int, kind: type) -> list:
    """One ``kind`` (int: group ids, bool: flags) per tensor; values are checked in C++."""
    what = "int" if kind is int else "bool"
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list of {what}s (one per tensor), got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{name}: expected {n} entries (one per tensor), got {len(value)}")
    if n and set(map(type, value)) != {kind}:  # C-level; True is an int to Python, not to us
        for i, v in enumerate(value):
            if type(v) is not kind:
                raise TypeError(f"{name}[{i}]: expected {'an' if kind is int else 'a'} {what}, got {type(v).__name__}")
    return value if type(value) is list else list(value)


def real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a Python number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name}: expected a finite{' positive' if positive else ''} number, got {value}")
    return value


_real = real


def check_method(method) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return method


def first_device(name: str, tensors: list) -> torch.device:
    """The device of ``tensors[0]`` (it picks the backend), or the contract's error."""
    if tensors and isinstance(tensors[0], torch.Tensor):
        return tensors[0].device
    _check_py([name], [tensors], 1, None, None)
    raise AssertionError("unreachable")  # _check_py raised


def check_tensors(names: list, lists: list, n_written: int, groups: list, fusion: list | None) -> int:
    """The contract (module docstring) on index-aligned lists; the first ``n_written`` are
    written by the op. Returns the number of groups (largest id + 1)."""
    from ._backends import _C

    if _C is None:
        return _check_py(names, lists, n_written, groups, fusion)
    if torch.compiler.is_compiling():  # traced: the operator checks at run time
        return max(groups) + 1
    try:  # the full checks once per layout (csrc/args.h), a fingerprint on later calls
        return _C.check_args_cached(names, lists, n_written, groups, fusion or [])
    except TypeError:  # pybind11 could not read a list: an element is not a tensor
        _check_py(names, lists, n_written, groups, fusion)
        raise


def explain(names: list, lists: list, n_written: int, groups, fusion, error: Exception) -> None:
    """Re-raises ``error`` of a direct operator call in the contract's words when the
    arguments could not even be read (an element that is not a tensor)."""
    # torch.ops words it "Expected a value of type", pybind11 (csrc/fast_calls.h) "incompatible function arguments".
    if isinstance(error, (TypeError, RuntimeError)) and any(
            s in str(error) for s in ("Expected a value of type", "incompatible function arguments")):
        _check_py(names, lists, n_written, groups, fusion)
    raise error


def _check_py(names, lists, n_written, groups, fusion) -> int:
    """``csrc/args.cpp`` in Python: the same checks, in the same order, the same messages."""
    n = len(lists[0])
    if n == 0:
        raise ValueError(f"{names[0]}: expected at least one tensor, got an empty list")
    for name, ts in zip(names, lists):
        if len(ts) != n:
            raise ValueError(f"{name}: expected {n} tensors (as many as {names[0]}), got {len(ts)}")
    inference = torch.is_inference_mode_enabled()
    for i in range(n):
        for li, (name, ts) in enumerate(zip(names, lists)):
            t, arg = ts[i], f"{name}[{i}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{arg}: expected a tensor, got {type(t).__name__}")
            like = lists[0][i]
            if t.dtype not in DTYPES:
                raise TypeError(f"{arg}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")
            if t.dtype != like.dtype:
                raise TypeError(f"{arg}: expected dtype {like.dtype} (as {names[0]}[{i}]), got {t.dtype}")
            if t.device != lists[0][0].device:
                raise ValueError(f"{arg}: expected device {lists[0][0].device} (as {names[0]}[0]), got {t.device}")
            if t.shape != like.shape:
                raise ValueError(f"{arg}: expected shape {tuple(like.shape)} (as {names[0]}[{i}]), got {tuple(t.shape)}")
            if t.layout != torch.strided or not t.is_contiguous():
                raise ValueError(f"{arg}: expected a contiguous tensor (call .contiguous() first)")
            if li < n_written and not inference and t.is_inference():
                raise ValueError(f"{arg}: is an inference tensor, which cannot be written outside "
                                 "torch.inference_mode() (clone it first, as torch's in-place ops require)")
    written, read = [], []
    for li, ts in enumerate(lists):
        for i, t in enumerate(ts):
            if t.numel() == 0 or t.device.type == "meta":
                continue
            b = t.data_ptr()
            (written if li < n_written else read).append((b, b + t.numel() * t.element_size(), li, i))
    written.sort()
    where = lambda s: f"{names[s[2]]}[{s[3]}]"  # noqa: E731
    for x, y in zip(written, written[1:]):
        if y[0] < x[1]:
            first, second = (x, y) if x[2:] < y[2:] else (y, x)
            raise ValueError(f"{where(second)}: overlaps {where(first)} in memory; a tensor the op writes may "
                             "share memory with nothing else")
    ends = [w[1] for w in written]
    for r in read:
        k = bisect.bisect_right(ends, r[0])
        while k < len(written) and written[k][0] < r[1]:
            w = written[k]
            if not (w[3] == r[3] and w[0] == r[0] and w[1] == r[1]):
                raise ValueError(f"{where(w)}: overlaps {where(r)} in memory; it may only be the very same memory "
                                 "as an input of the same index (in place) or share none")
            k += 1
    if groups is None:
        return 0
    if len(groups) != n:
        raise ValueError(f"groups: expected {n} entries (one per tensor), got {len(groups)}")
    for i, g in enumerate(groups):
        if g < OUTSIDE:
            raise ValueError(f"groups[{i}]: expected a group id >= 0, or -1 for outside every group, got {g}")
    if fusion is not None and len(fusion) and len(fusion) != n:
        raise ValueError(f"fusion: expected {n} entries (one per tensor), got {len(fusion)}")
    return max(groups) + 1 if groups else 0


def parse_combine_args(out, grads_mm, grads_uni, *, method, groups, gamma, alpha, fusion, max_norm,
                       tensors: bool = True) -> CombineArgs:
    """Checks and normalises ``combine_``'s arguments. ``tensors=False`` leaves the tensor
    checks to the operator (cpu, cuda backends); ``num_groups`` is then 0."""
    method = check_method(method)
    out = tensor_list("out", out)
    grads_mm = tensor_list("grads_mm", grads_mm)
    grads_uni = tensor_list("grads_uni", grads_uni)
    n = len(out)
    groups = [0] * n if groups is None else id_list("groups", groups, n, int)
    if fusion is None:
        fusion = [False] * n
    else:
        if method != "dgl":
            raise ValueError(f"fusion: only used by method='dgl', got method={method!r}")
        fusion = id_list("fusion", fusion, n, bool)
    gamma = real("gamma", gamma, positive=True)
    alpha = real("alpha", alpha)
    max_norm = None if max_norm is None else real("max_norm", max_norm, positive=True)
    num_groups = 0
    if tensors:
        num_groups = check_tensors(["out", "grads_mm", "grads_uni"], [out, grads_mm, grads_uni], 1, groups, fusion)
    return CombineArgs(out, grads_mm, grads_uni, method, groups, num_groups, fusion, gamma, alpha, max_norm)
