"""FSDP2 (``fully_shard``) for the training helpers: the gradients FSDP leaves in
``.grad`` are DTensors sharded over the data-parallel ranks, already averaged (FSDP
reduce-scatters each backward pass). The combine runs on the local shards; only the
few per-tensor sums it needs across shards (the Gram terms, the squared norms) are
all-reduced, ``3`` numbers per tensor for MMPareto, ``K(K+1)/2`` for K objectives, one
for DGL's clip. ``.grad`` stays the DTensor FSDP expects.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without DTensor
    DTensor, Shard = (), ()


def is_sharded(t) -> bool:
    return isinstance(t, DTensor) if DTensor else False


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a plain tensor is its own)."""
    return t._local_tensor if is_sharded(t) else t


def shard_groups(t) -> tuple:
    """The process groups over which ``t`` is sharded (its mesh dims with a Shard placement)."""
    if not is_sharded(t):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(d) for d, pl in enumerate(t.placements) if isinstance(pl, Shard))


def sum_over_shards(rows: torch.Tensor, tensors: list, owner: str) -> torch.Tensor:
    """``rows[i]`` (per-tensor partial sums over tensor i's local shard) summed over the
    ranks that hold the other shards, in place; tensors sharded the same way share one
    all-reduce."""
    by_groups = {}
    for i, t in enumerate(tensors):
        gs = shard_groups(t)
        if gs:
            by_groups.setdefault(gs, []).append(i)
    for gs, idx in by_groups.items():
        sel = torch.tensor(idx, device=rows.device)
        part = rows.index_select(0, sel)
        for g in gs:
            try:
                dist.all_reduce(part, group=g)
            except Exception as e:
                raise RuntimeError(f"{owner}: all-reduce of the per-tensor sums across shards failed; another rank "
                                   f"probably raised or died before reaching it ({type(e).__name__}: {e})") from e
        rows.index_copy_(0, sel, part)
    return rows


def combine_sharded_(a: list, b: list, groups: list, *, gamma: float, owner: str):
    """MMPareto on sharded gradients: ``a`` (DTensors or tensors) takes the update.

    The per-tensor Gram terms are computed on the local shards, summed across shards,
    and everything after that (group sums, weights, the per-tensor rescale) is the same
    for every rank; the combine itself is local.
    """
    from ..ops import group_layout, mmpareto_coefficients
    from ..pytorch.reference import dot64, group_stats

    al = [local(x).reshape(-1) for x in a]
    bl = [local(y).reshape(-1) for y in b]
    dev = al[0].device
    rows = torch.zeros(len(al), 4, dtype=torch.float64, device=dev)
    for i, (x, y) in enumerate(zip(al, bl)):
        rows[i, 0], rows[i, 1], rows[i, 2] = dot64(x, x), dot64(x, y), dot64(y, y)
        rows[i, 3] = (~torch.isfinite(x)).sum() + (~torch.isfinite(y)).sum()
    sum_over_shards(rows, a, owner)
    lay = group_layout(groups, max(groups) + 1, None, dev)
    per_tensor = rows[:, :3]
    stats = group_stats("mmpareto", lay.group_sums(per_tensor), 1.0, None, None, None, empty=lay.empty)
    ca, cb = mmpareto_coefficients(per_tensor, stats.w_mm, lay, gamma)
    sq = torch.zeros(len(al), 1, dtype=torch.float64, device=dev)
    for i, (x, y) in enumerate(zip(al, bl)):
        x.copy_(ca[i] * x.double() + cb[i] * y.double())  # fp64 coefficients, one rounding
        sq[i, 0] = dot64(x, x)
    sum_over_shards(sq, a, owner)
    total = sq.sum().sqrt()
    return stats._replace(total_norm=total, clip_coef=torch.ones_like(total), all_finite=rows[:, 3].sum() == 0)


def clip_sharded_(grads: list, groups: list, max_norm, *, owner: str):
    """``clip_grad_norm_`` over sharded (and plain) gradients: the squared norms of the
    local shards summed across shards, then every local shard scaled by the coefficient."""
    from ..ops import ClipStats

    ls = [local(g) for g in grads]
    dev = ls[0].device
    rows = torch.zeros(len(ls), 2, dtype=torch.float64, device=dev)
    for i, x in enumerate(ls):
        x64 = x.double()
        rows[i, 0] = x64.reshape(-1) @ x64.reshape(-1)
        rows[i, 1] = (~torch.isfinite(x64)).sum()
    sum_over_shards(rows, grads, owner)
    num_groups = max(groups) + 1 if groups else 0
    group_sq = torch.zeros(num_groups, dtype=torch.float64, device=dev)
    idx = torch.tensor(groups, device=dev)
    inside = idx >= 0
    group_sq.index_add_(0, idx[inside], rows[inside, 0])
    total = rows[:, 0].sum().sqrt()
    coef = torch.ones_like(total) if max_norm is None else (max_norm / (total + 1e-6)).clamp(max=1.0)
    if max_norm is not None:
        by_dtype = {}
        for x in ls:
            by_dtype.setdefault(x.dtype, []).append(x)
        for dt, xs in by_dtype.items():
            torch._foreach_mul_(xs, coef.to(dt))
    return ClipStats(group_sq, total, coef, rows[:, 1].sum() == 0)


def aggregate_sharded_(out: list, grads: list, groups: list, *, weighting: str, backend, owner: str, **kw):
    """``aggregate_`` on sharded gradients: the per-tensor ``K x K`` Grams of the local
    shards (step 1 of ``aggregate_``) summed across shards, then step 2 (group sums,
    weights, rescale, combine) on the local shards; every rank solves the same problems."""
    from ..ops import gram_k, weigh_and_combine

    lo = [local(x) for x in out]
    lg = [[local(x) for x in gk] for gk in grads]
    K, T = len(grads), len(out)
    per_tensor, finite = gram_k(lg, backend=backend, out=lo)
    rows = torch.cat([per_tensor.reshape(T, K * K), (~finite).to(torch.float64).expand(T, 1)], dim=1).contiguous()
    sum_over_shards(rows, out, owner)
    per_tensor = rows[:, :K * K].reshape(T, K, K)
    all_finite = rows[:, K * K].sum() == 0
    num_groups = max(groups) + 1 if groups else 0
    stats = weigh_and_combine(lo, lg, per_tensor, all_finite, weighting=weighting, groups=groups,
                               num_groups=num_groups, backend=backend, **kw)
    sq = stats.total_norm.square().reshape(1, 1)
    sum_over_shards(sq, out[:1], owner)  # FSDP2 shards every tensor over the same ranks
    return stats._replace(total_norm=sq.reshape(()).sqrt())
