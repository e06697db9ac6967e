"""What every weighting shares: argument checks, the call of the ``mmfast::weighting``
operator (one op per call, any batch of groups; csrc/solvers.h), and the pure-PyTorch
fallback (``reference``) where no kernel exists for ``G``'s device."""
from __future__ import annotations

import functools
import numbers

import torch

from ..ops import CUDA_BUILT as _CUDA_BUILT
from ..ops import extension as _C

MAX_K = 32  # csrc/solvers.h, kMaxK

# The rounding unit of each dtype: the rank cutoffs' unit (an eigenvalue, a pivot, below
# about K * eps of the largest is the input's rounding, not a direction of the data).
ROUNDING = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
            torch.bfloat16: 2.0 ** -8}

# Each weighting's keyword arguments and their defaults (eps: every weighting).
KEYWORDS = {
    "mgda": {},
    "pcgrad": {"seed": 0, "orders": None},
    "cagrad": {"c": 0.5, "norm_eps": 1e-4, "rescale": 0},
    "imtlg": {"rcond": None},
    "upgrad": {"reg_eps": 1e-4},
    "mmpareto": {"main": 0},
}


def rounding_unit(dtype: torch.dtype) -> float:
    return ROUNDING.get(dtype, 2.0 ** -53)


def _number(name: str, what: str, value, *, integer: bool = False, low=None, high=None) -> float:
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if ok:
        value = int(value) if integer else float(value)
        ok = (value == value and abs(value) != float("inf") and (low is None or value >= low)
              and (high is None or value <= high))
    if not ok:
        rng = f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else ""
        raise ValueError(f"{what}: {name}: expected a finite {'int' if integer else 'number'}{rng}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def _pcgrad_orders_cached(K: int, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return tuple(tuple(torch.randperm(K, generator=gen).tolist()) for _ in range(K))


@torch.compiler.assume_constant_result
def pcgrad_orders(K: int, seed: int) -> tuple:
    """The K orders of ``pcgrad(seed=seed)``: K draws of ``torch.randperm(K)`` from a CPU
    generator seeded with ``seed`` (the draws torchjd makes after ``torch.manual_seed``).
    Host-only and data-independent: a constant for ``torch.compile``, never a device sync."""
    return _pcgrad_orders_cached(K, seed)


def _orders_table(K: int, orders) -> tuple:
    rows = [list(o) for o in orders]
    if len(rows) != K or any(not all(isinstance(j, numbers.Integral) for j in o) for o in rows) or any(
            sorted(j for j in o if j != i) != [j for j in range(K) if j != i] for i, o in enumerate(rows)):
        raise ValueError(f"orders: expected K={K} permutations of range({K}) (entry i may omit i)")
    return tuple(int(j) for o in rows for j in (o + [-1] * (K - len(o)))[:K])


def op_args(name: str, K: int, kw: dict) -> tuple:
    """``(c, norm_eps, rescale, reg_eps, rcond, main, orders)`` for the operators, checked."""
    try:
        return _op_args_cached(name, K, tuple(sorted(kw.items())))
    except TypeError as e:
        if "unhashable" not in str(e):
            raise
        kw = {k: (tuple(map(tuple, v)) if k == "orders" and v is not None else v) for k, v in kw.items()}
        return _op_args_cached(name, K, tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=1024)
def _op_args_cached(name: str, K: int, items: tuple) -> tuple:
    if name not in KEYWORDS:
        raise ValueError(f"unknown weighting {name!r}; known: {', '.join(sorted(KEYWORDS))}")
    kw = dict(KEYWORDS[name])
    for key, value in items:
        if key not in kw:
            known = ", ".join(kw) or "none"
            raise TypeError(f"weighting {name!r}: unexpected keyword argument {key!r} (known: {known})")
        kw[key] = value
    c, norm_eps, rescale, reg_eps, rcond, main, orders = 0.5, 1e-4, 0, 1e-4, -1.0, 0, ()
    if name == "cagrad":
        c = _number("c", name, kw["c"], low=0)
        norm_eps = _number("norm_eps", name, kw["norm_eps"], low=0)
        if kw["rescale"] not in (0, 1, 2) or isinstance(kw["rescale"], bool):
            raise ValueError(f"cagrad: rescale: expected 0, 1 or 2, got {kw['rescale']!r}")
        rescale = int(kw["rescale"])
    elif name == "upgrad":
        reg_eps = _number("reg_eps", name, kw["reg_eps"], low=0)
    elif name == "imtlg":
        rcond = -1.0 if kw["rcond"] is None else _number("rcond", name, kw["rcond"], low=0)
    elif name == "mmpareto":
        main = _number("main", name, kw["main"], integer=True, low=-K, high=K - 1) % K
    elif name == "pcgrad":
        if kw["orders"] is None:
            orders = _orders_table(K, pcgrad_orders(K, int(_number("seed", name, kw["seed"], integer=True))))
        else:
            orders = _orders_table(K, kw["orders"])
    return c, norm_eps, rescale, reg_eps, rcond, main, list(orders)


_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}
_OPS = ("weighting", "aggregate_weights", "aggregate_k_", "gram_k", "combine_k_")


def _kernels() -> frozenset:
    """``(op, device_type)`` pairs with a kernel in this build (meta: a shape function), read
    from the dispatcher once at import: a plain set lookup later, which torch.compile traces
    (it cannot trace the dispatcher query itself)."""
    if _C is None:
        return frozenset()
    return frozenset((op, dev) for op in _OPS for dev, key in _KEYS.items()
                     if not (dev == "cuda" and not _CUDA_BUILT)
                     and torch._C._dispatch_has_kernel_for_dispatch_key(f"mmfast::{op}", key))


_KERNELS = _kernels()


def op_has_kernel(op: str, device_type: str) -> bool:
    """Whether the operator ``mmfast::<op>`` has a kernel for ``device_type`` in this build."""
    return (op, device_type) in _KERNELS


def has_kernel(device: torch.device) -> bool:
    """Whether ``mmfast::weighting`` runs on ``device``."""
    return op_has_kernel("weighting", device.type)


def check_gram(G) -> int:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G: expected a tensor, got {type(G).__name__}")
    if G.ndim < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"G: expected a [..., K, K] Gram matrix, got shape {tuple(G.shape)}")
    if G.shape[-1] < 1:
        raise ValueError("G: expected K >= 1 objectives")
    if not G.is_floating_point():
        raise TypeError(f"G: expected a floating dtype, got {G.dtype}")
    return G.shape[-1]


def solve(name: str, G: torch.Tensor, eps=None, **kw) -> torch.Tensor:
    """``G [..., K, K] -> w [..., K]`` in ``G``'s dtype, by the exact solver (one op)."""
    K = check_gram(G)
    args = op_args(name, K, kw)
    if K > MAX_K or not has_kernel(G.device):
        from . import reference

        ref_kw = {k: v for k, v in kw.items() if not (k == "rcond" and v is None)}
        return reference.WEIGHTINGS[name](G.detach(), **ref_kw).to(G.dtype)
    eps = rounding_unit(G.dtype) if eps is None else _number("eps", name, eps, low=0)
    lead = G.shape[:-2]
    w = torch.ops.mmfast.weighting(G.detach().reshape(-1, K, K), name, *args, eps)
    return w.reshape(lead + (K,))
