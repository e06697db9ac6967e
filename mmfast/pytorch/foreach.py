"""The fastest exact combine we can write with stock PyTorch ops: the "best pure
PyTorch" baseline of the benchmarks, and the fallback where no compiled backend exists.

Exact first (docs/semantics.md, Precision): every product and sum is fp64. The tensors are
cut into pieces of at most ``SLICE`` elements (the summation depth of reference.py's
zero rule) and packed into fp64 buffers of at most ``BUFFER`` elements (big tensors a
few pieces, small ones many to a buffer), which bounds the temporary memory
and keeps the op count per buffer, not per tensor: per buffer, the Gram pass is three
products and one segmented sum (per-piece ``aa, ab, bb``); the combine pass forms
``ca a + cb b`` in fp64 with per-element coefficients and copies it back into the
outputs (rounding once). The temporaries total about 12 MB. No host synchronisation; after the first call with a layout,
no host data either (the plan is cached).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..ops import CombineArgs, CombineStats, group_layout, mmpareto_coefficients
from .reference import SLICE, clip_coefficient, group_stats, scale_

BUFFER = 1 << 18  # 2 MB per fp64 temporary: they stay in the caches (fastest of 2^16..2^20 here)


class _Buffer:
    """A run of pieces ``(tensor, begin, end)`` packed into one fp64 buffer."""

    def __init__(self, pieces, device):
        self.pieces = pieces
        self.sizes = [e - b for _, b, e in pieces]
        self.n = sum(self.sizes)
        self.single = len({t for t, _, _ in pieces}) == 1  # one tensor: scalar coefficients
        dev = dict(device=device)
        self.lengths = torch.tensor(self.sizes, dtype=torch.long).to(**dev)
        self.tensor = torch.tensor([t for t, _, _ in pieces], dtype=torch.long).to(**dev)
        self.first = pieces[0][0]


class _Plan:
    """The pieces of a list of tensors (by their sizes), in tensor order, and their buffers."""

    def __init__(self, numels, device):
        buffers, current, fill = [], [], 0
        pieces_per_tensor = []
        for t, n in enumerate(numels):
            begins = range(0, n, SLICE)
            pieces_per_tensor.append(len(begins))
            for b in begins:
                e = min(b + SLICE, n)
                if fill + (e - b) > BUFFER and current:
                    buffers.append(current)
                    current, fill = [], 0
                current.append((t, b, e))
                fill += e - b
        if current:
            buffers.append(current)
        self.buffers = [_Buffer(p, device) for p in buffers]
        self.per_tensor = torch.tensor(pieces_per_tensor, dtype=torch.long).to(device)
        self.n_tensors = len(numels)
        self.largest = max((buf.n for buf in self.buffers), default=0)
        self.device = device


_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()


def _plan(tensors) -> _Plan:
    key = (tuple(x.numel() for x in tensors), tensors[0].device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(key[0], key[1])
        if len(_PLANS) > 16:
            _PLANS.popitem(last=False)
    return plan


def _pack(tensors, buf: _Buffer, into: torch.Tensor, drop=None) -> torch.Tensor:
    """The buffer's pieces of ``tensors`` as one fp64 vector (written into ``into``); the
    pieces of a tensor whose ``drop`` is True are zeros (that input is not part of the
    result, so its NaN cannot reach it)."""
    into = into[: buf.n]
    parts = [tensors[t].view(-1)[b:e] for t, b, e in buf.pieces]
    if len(parts) == 1:
        into.copy_(parts[0])
    else:
        torch.cat(parts, out=into)
    if drop is not None:
        begin = 0
        for (t, b, e), size in zip(buf.pieces, buf.sizes):
            if drop[t]:
                into[begin:begin + size].zero_()
            begin += size
    return into


def _scratch(plan: _Plan, k: int) -> list:
    return [torch.empty(plan.largest, dtype=torch.float64, device=plan.device) for _ in range(k)]


def gram_per_tensor(a, b, plan: _Plan | None = None) -> torch.Tensor:
    """``[T, 3]`` fp64 ``(<a,a>, <a,b>, <b,b>)`` per tensor (``b`` may be ``a``)."""
    plan = plan or _plan(a)
    if not plan.buffers:
        return torch.zeros(plan.n_tensors, 3, dtype=torch.float64, device=a[0].device)
    xs, ys = _scratch(plan, 2)
    prods = torch.empty(plan.largest, 3, dtype=torch.float64, device=plan.device)
    per_piece = []
    for buf in plan.buffers:
        x = _pack(a, buf, xs)
        y = x if b is a else _pack(b, buf, ys)
        p = prods[: buf.n]
        torch.mul(x, x, out=p[:, 0])
        torch.mul(x, y, out=p[:, 1])
        torch.mul(y, y, out=p[:, 2])
        per_piece.append(torch.segment_reduce(p, "sum", lengths=buf.lengths, axis=0, unsafe=True))
    pieces = torch.cat(per_piece)
    return torch.segment_reduce(pieces, "sum", lengths=plan.per_tensor, axis=0, unsafe=True)


def all_finite(per_tensor: torch.Tensor, tensors) -> torch.Tensor:
    """Whether every element is finite. From the fp64 square sums, which cannot overflow
    for inputs of at most fp32 range; float64 inputs are asked directly."""
    finite = torch.isfinite(per_tensor[:, 0::2]).all()
    wide = [x for x in tensors if x.dtype == torch.float64]
    if wide:
        finite = finite & torch.stack([torch.isfinite(x).all() for x in wide]).all()
    return finite


def combine_foreach(args: CombineArgs) -> CombineStats:
    a, b, out = args.grads_mm, args.grads_uni, args.out
    plan = _plan(a)
    lay = group_layout(args.groups, args.num_groups, args.fusion if args.method == "dgl" else None, a[0].device)
    per_tensor = gram_per_tensor(a, b, plan)
    finite = all_finite(per_tensor, a + b)
    gram = lay.group_sums(per_tensor)
    stats = group_stats(args.method, gram, args.alpha, None, None, finite, lay.empty)

    drop_a = drop_b = None
    if args.method == "mmpareto":
        ca, cb = mmpareto_coefficients(per_tensor, stats.w_mm, lay, args.gamma)
    else:
        ca, cb, _ = lay.roles(args.method, args.alpha)
        if args.method == "dgl":  # a dropped input is not part of the result
            drop_a = [g >= 0 and not f for g, f in zip(args.groups, args.fusion)]
            drop_b = args.fusion

    total_sq = torch.zeros((), dtype=torch.float64, device=a[0].device)
    xs, ys, vs = _scratch(plan, 3)
    for buf in plan.buffers:
        x = _pack(a, buf, xs, drop_a)
        y = _pack(b, buf, ys, drop_b)
        if buf.single:  # one tensor: its coefficients broadcast
            ca_e, cb_e = ca[buf.first:buf.first + 1], cb[buf.first:buf.first + 1]
        else:
            ca_e = ca.index_select(0, buf.tensor).repeat_interleave(buf.lengths, output_size=buf.n)
            cb_e = cb.index_select(0, buf.tensor).repeat_interleave(buf.lengths, output_size=buf.n)
        v = torch.mul(x, ca_e, out=vs[: buf.n]).addcmul_(y, cb_e)  # fp64: under strong conflict the terms cancel
        total_sq = total_sq + torch.dot(v, v)
        views = [out[t].view(-1)[b0:e] for t, b0, e in buf.pieces]
        torch._foreach_copy_(views, list(v.split(buf.sizes)))
    total_norm = total_sq.sqrt()
    clip_coef = clip_coefficient(total_norm, args.max_norm)
    if args.max_norm is not None:
        scale_(out, clip_coef)
    return stats._replace(total_norm=total_norm, clip_coef=clip_coef)
