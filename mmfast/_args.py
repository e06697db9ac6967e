"""Checks and normalises the arguments of ``combine_`` once, for every backend."""
from __future__ import annotations

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


def _tensor_list(name: str, value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")
    return list(value)


def _real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a Python number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name}: expected a finite{' positive' if positive else ''} number, got {value}")
    return value


def _overlaps(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two contiguous tensors share memory without being the same buffer."""
    if x.numel() == 0 or y.numel() == 0 or x.device != y.device:
        return False
    x0, y0 = x.data_ptr(), y.data_ptr()
    x1 = x0 + x.numel() * x.element_size()
    y1 = y0 + y.numel() * y.element_size()
    same = x0 == y0 and x1 == y1
    return not same and x0 < y1 and y0 < x1


def parse_combine_args(out, grads_mm, grads_uni, *, method, groups, gamma, alpha, fusion, max_norm) -> CombineArgs:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
    lists = {
        "out": _tensor_list("out", out),
        "grads_mm": _tensor_list("grads_mm", grads_mm),
        "grads_uni": _tensor_list("grads_uni", grads_uni),
    }
    n = len(lists["out"])
    if n == 0:
        raise ValueError("out: expected at least one tensor, got an empty list")
    for name, ts in lists.items():
        if len(ts) != n:
            raise ValueError(f"{name}: expected {n} tensors (as many as out), got {len(ts)}")
    device = lists["out"][0].device
    for i in range(n):
        ref = lists["out"][i]
        for name, ts in lists.items():
            t = ts[i]
            if t.dtype not in DTYPES:
                raise TypeError(f"{name}[{i}]: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")
            if t.dtype != ref.dtype:
                raise TypeError(f"{name}[{i}]: expected dtype {ref.dtype} (as out[{i}]), got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name}[{i}]: expected device {device} (as out[0]), got {t.device}")
            if t.shape != ref.shape:
                raise ValueError(f"{name}[{i}]: expected shape {tuple(ref.shape)} (as out[{i}]), got {tuple(t.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}]: expected a contiguous tensor (call .contiguous() first)")
        if not torch.compiler.is_compiling():
            for name in ("grads_mm", "grads_uni"):
                if _overlaps(ref, lists[name][i]):
                    raise ValueError(f"out[{i}]: overlaps {name}[{i}] partially; it must be the same tensor or not share memory")

    if groups is None:
        groups = [0] * n
    else:
        if isinstance(groups, torch.Tensor) or not isinstance(groups, (list, tuple)):
            raise TypeError(f"groups: expected a list of ints (one group id per tensor), got {type(groups).__name__}")
        if len(groups) != n:
            raise ValueError(f"groups: expected {n} entries (one per tensor), got {len(groups)}")
        for i, g in enumerate(groups):
            if isinstance(g, bool) or not isinstance(g, int):
                raise TypeError(f"groups[{i}]: expected an int, got {type(g).__name__}")
            if g < OUTSIDE:
                raise ValueError(f"groups[{i}]: expected a group id >= 0, or -1 for outside every group, got {g}")
        groups = list(groups)
    num_groups = max(groups) + 1 if groups else 0

    if fusion is None:
        fusion = [False] * n
    else:
        if method != "dgl":
            raise ValueError(f"fusion: only used by method='dgl', got method={method!r}")
        if isinstance(fusion, torch.Tensor) or not isinstance(fusion, (list, tuple)):
            raise TypeError(f"fusion: expected a list of bools (one per tensor), got {type(fusion).__name__}")
        if len(fusion) != n:
            raise ValueError(f"fusion: expected {n} entries (one per tensor), got {len(fusion)}")
        for i, f in enumerate(fusion):
            if not isinstance(f, bool):
                raise TypeError(f"fusion[{i}]: expected a bool, got {type(f).__name__}")
        fusion = list(fusion)

    return CombineArgs(
        out=lists["out"],
        grads_mm=lists["grads_mm"],
        grads_uni=lists["grads_uni"],
        method=method,
        groups=groups,
        num_groups=num_groups,
        fusion=fusion,
        gamma=_real("gamma", gamma, positive=True),
        alpha=_real("alpha", alpha),
        max_norm=None if max_norm is None else _real("max_norm", max_norm, positive=True),
    )
