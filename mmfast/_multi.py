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

from ._args import OUTSIDE, _tensor_list
from ._backends import select_backend
from ._device_math import group_sums
from .reference import ZERO_REL, acc_dtype


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
    out = _tensor_list("out", out)
    if not out:
        raise ValueError("out: expected at least one tensor, got an empty list")
    if not isinstance(grads, (list, tuple)) or len(grads) < 1:
        raise TypeError("grads: expected a list of K gradient lists (one per objective)")
    grads = [_tensor_list(f"grads[{k}]", g) for k, g in enumerate(grads)]
    for k, gs in enumerate(grads):
        if len(gs) != len(out):
            raise ValueError(f"grads[{k}]: expected {len(out)} tensors (as out), got {len(gs)}")
        for i, (g, o) in enumerate(zip(gs, out)):
            if g.shape != o.shape or g.dtype != o.dtype or g.device != o.device:
                raise ValueError(f"grads[{k}][{i}]: expected {tuple(o.shape)} {o.dtype} on {o.device} (as out[{i}]), "
                                 f"got {tuple(g.shape)} {g.dtype} on {g.device}")
            if not g.is_contiguous() or not o.is_contiguous():
                raise ValueError(f"grads[{k}][{i}] / out[{i}]: expected contiguous tensors")
    if groups is None:
        groups = [0] * len(out)
    groups = list(groups)
    if len(groups) != len(out):
        raise ValueError(f"groups: expected {len(out)} entries (one per tensor), got {len(groups)}")
    return out, grads, groups


def _gram_torch(grads, K):
    per = []
    for t in range(len(grads[0])):
        J = torch.stack([grads[k][t].reshape(-1).to(torch.float64) for k in range(K)])
        per.append(J @ J.T)
    G = torch.stack(per)
    return G, torch.isfinite(G).all()


def _combine_torch(out, grads, coefs):
    sq = []
    for t, o in enumerate(out):
        acc = sum(coefs[t, k].to(acc_dtype(o.dtype)) * grads[k][t].to(acc_dtype(o.dtype)) for k in range(len(grads)))
        o.copy_(acc)
        sq.append(torch.linalg.vector_norm(acc, dtype=torch.float64).square())
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
    from .weightings import weights as weigh

    out, grads, groups = _check(out, grads, groups)
    K, T = len(grads), len(out)
    name = select_backend(backend, out[0].device)
    flat = [grads[k][t] for t in range(T) for k in range(K)]
    with torch.no_grad():
        if name in ("cpu", "cuda"):
            per_tensor, all_finite = torch.ops.mmfast.gram_k(flat, K)
        elif name == "triton":
            from .kernels.multi import gram_k_triton

            per_tensor, all_finite = gram_k_triton(out, grads)
        else:
            per_tensor, all_finite = _gram_torch(grads, K)
        num_groups = max(groups) + 1 if groups else 0
        gram = group_sums(per_tensor.reshape(T, K * K), groups, num_groups).reshape(num_groups, K, K)
        w = weigh(weighting, gram, **weighting_kw) if num_groups else gram.new_zeros(0, K)
        g_idx = torch.tensor([max(g, 0) for g in groups], device=per_tensor.device)
        inside = torch.tensor([g != OUTSIDE for g in groups], device=per_tensor.device)
        wt = w[g_idx] if num_groups else per_tensor.new_ones(T, K)
        if weighting == "mmpareto":
            # SEMANTICS.md's rescale, for K: n_t = K sum_k w_k g_k, g_t = gamma n_t max(||sum g||/||n_t||, 1).
            nn = K * K * torch.einsum("tk,tkl,tl->t", wt, per_tensor, wt).clamp(min=0)
            ones = torch.ones_like(wt)
            ss = torch.einsum("tk,tkl,tl->t", ones, per_tensor, ones).clamp(min=0)
            terms = K * K * (wt * wt * torch.diagonal(per_tensor, dim1=1, dim2=2)).sum(1)
            s = torch.where(nn <= ZERO_REL * terms, 0.0, gamma * K * (ss.sqrt() / nn.sqrt()).clamp(min=1.0))
            wt = wt * s[:, None]
        coefs = torch.where(inside[:, None], wt, 1.0).contiguous()
        if name in ("cpu", "cuda"):
            sq = torch.ops.mmfast.combine_k_(out, flat, K, coefs)
        elif name == "triton":
            from .kernels.multi import combine_k_triton

            sq = combine_k_triton(out, grads, coefs)
        else:
            sq = _combine_torch(out, grads, coefs)
    return AggregateStats(gram, w, sq.sum().sqrt(), all_finite)
