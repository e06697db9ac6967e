"""``mmfast.aggregate_``: K gradient sets combined by a Gramian weighting, fused.

Two passes over the K buffers, as ``combine_`` does for two: a Gram pass giving
per-tensor ``K x K`` Gram matrices in one read of the K gradients, a weighting
step on the device (``mmfast.weightings``: a ``[G, K, K] -> [G, K]`` function,
fixed iteration budgets, no host sync), and a combine pass writing
``out_t = sum_k c_tk g_tk``. Only a ``K x K`` matrix per group ever exists between
the passes; the usual pattern (concatenate into ``K x N``, Gram, solve on the host,
combine) copies every gradient once more and synchronises.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._args import check_tensors, id_list, tensor_list
from ._backends import select_backend
from ._device_math import group_layout
from ..pytorch.reference import SLICE, is_zero_norm


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


def _gram_torch(grads, K):
    """Per-tensor ``[T, K, K]`` fp64 Gram: exact products, fp64 sums over slices of SLICE."""
    per = []
    for t in range(len(grads[0])):
        J = torch.stack([grads[k][t].reshape(-1).to(torch.float64) for k in range(K)])
        per.append(sum((Js @ Js.T for Js in J.split(SLICE, dim=1)), J.new_zeros(K, K)))
    G = torch.stack(per)
    finite = torch.stack([torch.isfinite(g).all() for gk in grads for g in gk]).all()
    return G, finite


def _combine_torch(out, grads, coefs):
    """``out_t = sum_k c_tk g_tk`` in fp64 with fp64 coefficients, rounded once."""
    sq = []
    for t, o in enumerate(out):
        acc = sum(coefs[t, k] * grads[k][t].double() for k in range(len(grads)))
        o.copy_(acc)
        sq.append(torch.dot(acc.reshape(-1), acc.reshape(-1)))
    return torch.stack(sq)


def aggregate_(out, grads, *, weighting: str = "upgrad", groups=None, gamma: float = 1.5, backend=None,
               **weighting_kw) -> AggregateStats:
    """Writes the aggregate of K objectives' gradients into ``out`` (may be ``grads[0]``).

    Args:
        out: list of tensors (or one tensor).
        grads: K lists like ``out``: ``grads[k][t]`` is objective k's gradient of tensor t.
        weighting: a name in ``mmfast.weightings.WEIGHTINGS`` (``mgda``, ``pcgrad``,
            ``cagrad``, ``imtlg``, ``upgrad``, ``mmpareto``).
        groups: one group id per tensor (weights are per group), -1 for tensors that
            get the plain sum. Default: one group.
        gamma: ``mmpareto`` only: the magnitude factor of its per-tensor rescale.
        backend: ``"cpu"``, ``"cuda"`` or ``"triton"`` (fused), ``"foreach"``/``"torch"``
            (plain PyTorch), or None.
    """
    from ..weightings import weights as weigh

    out, grads, groups, num_groups = _check(out, grads, groups)
    K, T = len(grads), len(out)
    name = select_backend(backend, out[0].device)
    flat = [grads[k][t] for t in range(T) for k in range(K)]
    with torch.no_grad():
        if name in ("cpu", "cuda"):
            per_tensor, all_finite = torch.ops.mmfast.gram_k(flat, K)
        elif name == "triton":
            from ..kernels.multi import gram_k_triton

            per_tensor, all_finite = gram_k_triton(out, grads)
        else:
            per_tensor, all_finite = _gram_torch(grads, K)
        lay = group_layout(groups, num_groups, None, per_tensor.device)
        gram = lay.group_sums(per_tensor.reshape(T, K * K)).reshape(num_groups, K, K)
        w = weigh(weighting, gram, **weighting_kw) if num_groups else gram.new_zeros(0, K)
        inside = lay.inside
        wt = w.index_select(0, lay.index) if num_groups else per_tensor.new_ones(T, K)
        if weighting == "mmpareto":
            # SEMANTICS.md's rescale, for K: n_t = K sum_k w_k g_k, g_t = gamma n_t max(||sum g||/||n_t||, 1).
            nn = K * K * torch.einsum("tk,tkl,tl->t", wt, per_tensor, wt).clamp(min=0)
            ones = torch.ones_like(wt)
            ss = torch.einsum("tk,tkl,tl->t", ones, per_tensor, ones).clamp(min=0)
            # The zero rule of mmfast/reference.py, with K terms: (sum_k |w_k| ||g_k||)^2 bounds them.
            terms = K * K * (wt.abs() * torch.diagonal(per_tensor, dim1=1, dim2=2).sqrt()).sum(1) ** 2
            s = torch.where(is_zero_norm(nn, terms), 0.0, gamma * K * (ss.sqrt() / nn.clamp(min=0).sqrt()).clamp(min=1.0))
            wt = wt * s[:, None]
        coefs = torch.where(inside[:, None], wt, 1.0).contiguous()
        if name in ("cpu", "cuda"):
            sq = torch.ops.mmfast.combine_k_(out, flat, K, coefs)
        elif name == "triton":
            from ..kernels.multi import combine_k_triton

            sq = combine_k_triton(out, grads, coefs)
        else:
            sq = _combine_torch(out, grads, coefs)
    return AggregateStats(gram, w, sq.sum().sqrt(), all_finite)
