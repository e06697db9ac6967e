"""``mmfast.aggregate_``: K gradient sets combined by a Gramian weighting, fused.

Two passes over the K buffers, as ``combine_`` does for two, and one small op between:

1. ``_gram_k``: per-tensor ``K x K`` fp64 Gram matrices in one read of the K gradients.
2. ``_weigh_and_combine``: the group sums of those, every group's weighting solved
   exactly (csrc/solvers.h, all groups in one go, with the mmpareto rescale and the
   per-tensor coefficients), then ``out_t = sum_k c_tk g_tk`` in one more read.

On the cpu and cuda backends ``aggregate_`` is one operator call for all of it
(``mmfast::aggregate_k_``); ``triton`` runs its two passes around the
``mmfast::aggregate_weights`` op, the plain-PyTorch backends around torch ops.

The two steps are separate so that a sharded caller (FSDP2: each rank holds a shard of
every tensor) can all-reduce the per-tensor Grams between them. Only a ``K x K`` matrix
per tensor and per group ever exists between the passes; the usual pattern (concatenate
into ``K x N``, Gram, solve on the host, combine) copies every gradient once more and
synchronises.

Host work per call after the first with a layout: the argument checks and building the
flat list; no tensor is made from host data (the group layout is built once per
``(groups, device)`` and cached), nothing is read back.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch

from ._args import OUTSIDE, check_tensors, id_list, real, tensor_list
from ._backends import select_backend
from ..pytorch.reference import SLICE, is_zero_norm
from .. import weightings as _solve  # its op-side names: op_args, op_has_kernel, rounding_unit, MAX_K


class AggregateStats(NamedTuple):
    """Device tensors: ``gram [G, K, K]`` (per group), ``weights [G, K]`` (the
    weighting's output), ``total_norm`` (of every output), ``all_finite``."""

    gram: torch.Tensor
    weights: torch.Tensor
    total_norm: torch.Tensor
    all_finite: torch.Tensor
    names: tuple = ()

    def as_dict(self) -> dict:
        w = self.weights.detach().cpu().tolist()
        weights = dict(zip(self.names, w)) if self.names else w
        return {"weights": weights, "total_norm": float(self.total_norm), "all_finite": bool(self.all_finite)}


def _check(out, grads, groups):
    """The contract of combine_ (mmfast/_args.py): out and the K lists index-aligned."""
    out = tensor_list("out", out)
    if not isinstance(grads, (list, tuple)) or len(grads) < 1:
        raise TypeError("grads: expected a list of K gradient lists (one per objective)")
    grads = [tensor_list(f"grads[{k}]", g) for k, g in enumerate(grads)]
    groups = [0] * len(out) if groups is None else id_list("groups", groups, len(out), int)
    names = ["out"] + [f"grads[{k}]" for k in range(len(grads))]
    num_groups = check_tensors(names, [out, *grads], 1, groups, None)
    return out, grads, groups, num_groups


class _Layout:
    """What the group ids fix, on the device, built once per ``(groups, device)``.

    ``table``: the int64 layout ``mmfast::aggregate_weights`` reads: ids [T] (group of
    each tensor, -1 outside), first [G + 2] (offsets into order; "group" G holds the
    tensors outside every group), order [T] (tensors by group, tensor order within one).
    The rest is for the pure-PyTorch path.
    """

    def __init__(self, groups: tuple, num_groups: int, device: torch.device):
        T = len(groups)
        order = sorted(range(T), key=lambda t: (groups[t] if groups[t] != OUTSIDE else num_groups, t))
        counts = [0] * (num_groups + 1)
        for g in groups:
            counts[g if g != OUTSIDE else num_groups] += 1
        first = [0]
        for c in counts:
            first.append(first[-1] + c)
        self.table = torch.tensor(list(groups) + first + order, dtype=torch.int64).to(device)
        inside = [t for t in order if groups[t] != OUTSIDE]
        self.perm = torch.tensor(inside, dtype=torch.int64).to(device)
        self.lengths = torch.tensor(counts[:num_groups], dtype=torch.int64).to(device)
        self.index = torch.tensor([max(g, 0) for g in groups], dtype=torch.int64).to(device)
        self.inside = torch.tensor([g != OUTSIDE for g in groups], dtype=torch.bool).to(device)


# One entry per (groups, device): a few small tensors. Bounded (LRU); an evicted table is
# freed through the caching allocator, which only reuses its block in the stream order of
# the stream that allocated it, after every kernel queued there that reads it.
_LAYOUTS: "OrderedDict[tuple, _Layout]" = OrderedDict()
_MAX_LAYOUTS = 256


def _layout(groups: list, num_groups: int, device: torch.device) -> _Layout:
    key = (tuple(groups), num_groups, device)
    lay = _LAYOUTS.get(key)
    if lay is None:
        lay = _LAYOUTS[key] = _Layout(key[0], num_groups, device)
        if len(_LAYOUTS) > _MAX_LAYOUTS:
            _LAYOUTS.popitem(last=False)
    return lay


def _flat(grads: list) -> list:
    """Tensor-major: ``flat[t * K + k] = grads[k][t]``."""
    return [g for ts in zip(*grads) for g in ts]


def _fused(name: str) -> bool:
    return name in ("cpu", "cuda")


def _one_op(name: str) -> bool:
    """Whether the whole of aggregate_ is one op (``mmfast::aggregate_k_``) on this backend."""
    return _fused(name) and _solve.op_has_kernel("aggregate_k_", name)


def _gram_k(grads, *, backend=None, out=None) -> tuple:
    """Step 1: ``(per_tensor [T, K, K] float64, all_finite)``, the Gram of each tensor's
    K gradients (fp64 products and sums), before any group sum. ``grads``: K lists of T
    tensors (checked here unless called by ``aggregate_``, which checked them)."""
    K = len(grads)
    name = select_backend(backend, grads[0][0].device)
    if _fused(name):
        return torch.ops.mmfast.gram_k(_flat(grads), K)
    if name == "triton":
        from ..kernels.multi import gram_k_triton

        return gram_k_triton(grads[0] if out is None else out, grads)
    return _gram_torch(grads, K)


def _weigh_and_combine(out, grads, per_tensor, all_finite=None, *, weighting: str = "upgrad", groups=None,
                       num_groups=None, gamma: float = 1.5, backend=None, **weighting_kw) -> AggregateStats:
    """Step 2: group sums of ``per_tensor`` (the per-tensor Grams of step 1, possibly
    all-reduced across ranks), the weighting of every group, the mmpareto rescale, and
    ``out_t = sum_k c_tk g_tk``. ``groups``: one id per tensor (-1 outside); default one
    group. ``all_finite``: step 1's (default: whether ``per_tensor`` is finite). Returns
    the stats (total_norm over this process's ``out``). On the cpu and cuda backends this
    is one op (``mmfast::aggregate_k_`` given ``per_tensor``)."""
    K, T = len(grads), len(out)
    if groups is None:
        groups = [0] * T
    if num_groups is None:
        num_groups = max(groups) + 1 if groups else 0
    lay = _layout(groups, num_groups, per_tensor.device)
    args = _solve.op_args(weighting, K, weighting_kw)
    eps = _solve.rounding_unit(out[0].dtype)
    name = select_backend(backend, out[0].device)
    g = gamma if weighting == "mmpareto" else None
    if _one_op(name):
        gram, w, total_norm, finite = torch.ops.mmfast.aggregate_k_(
            out, _flat(grads), K, per_tensor, lay.table, num_groups, weighting, *args, eps, g)
        return AggregateStats(gram, w, total_norm, finite if all_finite is None else all_finite)
    if K <= _solve.MAX_K and _solve.op_has_kernel("aggregate_weights", per_tensor.device.type):
        gram, w, coefs = torch.ops.mmfast.aggregate_weights(per_tensor, lay.table, num_groups, weighting, *args, eps, g)
    else:
        gram, w, coefs = _weights_torch(per_tensor, lay, num_groups, weighting, g, eps, weighting_kw)
    if _fused(name):
        sq = torch.ops.mmfast.combine_k_(out, _flat(grads), K, coefs)
    elif name == "triton":
        from ..kernels.multi import combine_k_triton

        sq = combine_k_triton(out, grads, coefs)
    else:
        sq = _combine_torch(out, grads, coefs)
    if all_finite is None:
        all_finite = torch.isfinite(per_tensor).all()
    return AggregateStats(gram, w, sq.sum().sqrt(), all_finite)


def aggregate_(out, grads, *, weighting: str = "upgrad", groups=None, gamma: float = 1.5, backend=None,
               **weighting_kw) -> AggregateStats:
    """Writes the aggregate of K objectives' gradients into ``out`` (may be ``grads[0]``).

    Args:
        out: list of tensors (or one tensor).
        grads: K lists like ``out``: ``grads[k][t]`` is objective k's gradient of tensor t.
        weighting: a name in ``mmfast.weightings.WEIGHTINGS`` (``mgda``, ``pcgrad``,
            ``cagrad``, ``imtlg``, ``upgrad``, ``mmpareto``); extra keyword arguments go
            to it. Solved exactly per group on the tensors' device (one op for all
            groups); rank cutoffs use the gradients' dtype's rounding unit.
        groups: one group id per tensor (weights are per group), -1 for tensors that
            get the plain sum. Default: one group.
        gamma: ``mmpareto`` only: the magnitude factor of its per-tensor rescale,
            docs/semantics.md's for K objectives: ``n_t = K sum_k w_k g_k``, ``out_t = gamma
            n_t max(||sum_k g_k|| / ||n_t||, 1)`` (0 where ``n_t`` is 0 by the zero rule).
        backend: ``"cpu"``, ``"cuda"`` or ``"triton"`` (fused), ``"foreach"``/``"torch"``
            (plain PyTorch passes), or None.
    """
    out, grads, groups, num_groups = _check(out, grads, groups)
    if weighting == "mmpareto":
        gamma = real("gamma", gamma, positive=True)
    K = len(grads)
    args = _solve.op_args(weighting, K, weighting_kw)  # a bad weighting fails before any pass
    name = select_backend(backend, out[0].device)
    with torch.no_grad():
        if _one_op(name):  # one op: both passes and the weighting step
            lay = _layout(groups, num_groups, out[0].device)
            gram, w, total_norm, all_finite = torch.ops.mmfast.aggregate_k_(
                out, _flat(grads), K, None, lay.table, num_groups, weighting, *args,
                _solve.rounding_unit(out[0].dtype), gamma if weighting == "mmpareto" else None)
            return AggregateStats(gram, w, total_norm, all_finite)
        per_tensor, all_finite = _gram_k(grads, backend=name, out=out)
        return _weigh_and_combine(out, grads, per_tensor, all_finite, weighting=weighting, groups=groups,
                                  num_groups=num_groups, gamma=gamma, backend=name, **weighting_kw)


# ---------------------------------------------------------------- pure PyTorch (no extension)

def _gram_torch(grads, K):
    """Per-tensor ``[T, K, K]`` fp64 Gram: exact products, fp64 sums over slices of SLICE."""
    per = []
    for t in range(len(grads[0])):
        J = torch.stack([grads[k][t].reshape(-1).to(torch.float64) for k in range(K)])
        per.append(sum((Js @ Js.T for Js in J.split(SLICE, dim=1)), J.new_zeros(K, K)))
    G = torch.stack(per)
    finite = torch.stack([torch.isfinite(g).all() for gk in grads for g in gk]).all()
    return G, finite


def _weights_torch(per_tensor, lay, num_groups, weighting, gamma, eps, kw):
    """``mmfast::aggregate_weights`` in torch ops (builds without the extension)."""
    T, K = per_tensor.shape[0], per_tensor.shape[1]
    if num_groups:
        rows = per_tensor.reshape(T, K * K).index_select(0, lay.perm)
        gram = torch.segment_reduce(rows, "sum", lengths=lay.lengths, axis=0, unsafe=True).reshape(-1, K, K)
        from ..weightings import weights

        w = weights(weighting, gram, eps=eps, **kw).to(torch.float64)
        wt = w.index_select(0, lay.index)
    else:
        gram, w = per_tensor.new_zeros(0, K, K), per_tensor.new_zeros(0, K)
        wt = per_tensor.new_ones(T, K)
    if gamma is not None:
        nn = K * K * torch.einsum("tk,tkl,tl->t", wt, per_tensor, wt).clamp(min=0)
        ss = per_tensor.sum((1, 2)).clamp(min=0)
        terms = K * K * (wt.abs() * torch.diagonal(per_tensor, dim1=1, dim2=2).sqrt()).sum(1) ** 2
        s = torch.where(is_zero_norm(nn, terms), 0.0, gamma * K * (ss.sqrt() / nn.sqrt()).clamp(min=1.0))
        wt = wt * s[:, None]
    coefs = torch.where(lay.inside[:, None], wt, 1.0).contiguous()
    return gram, w, coefs


def _combine_torch(out, grads, coefs):
    """``out_t = sum_k c_tk g_tk`` in fp64 with fp64 coefficients, rounded once."""
    sq = []
    for t, o in enumerate(out):
        acc = sum(coefs[t, k] * grads[k][t].double() for k in range(len(grads)))
        o.copy_(acc)
        sq.append(torch.dot(acc.reshape(-1), acc.reshape(-1)))
    return torch.stack(sq)
