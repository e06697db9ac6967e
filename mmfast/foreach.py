"""The fastest combine we can write with stock PyTorch ops: the "best pure PyTorch"
baseline of the benchmarks, and the fallback where no compiled backend exists.

Per-tensor reductions (three ``dot`` per tensor), the weights and scales as a handful of device-side ops over ``[T]``
tensors, and two in-place elementwise ops per tensor. No clones, no
concatenation, no host synchronisation. It still reads the gradients four times
in the Gram phase and twice (plus ``out``) in the combine, where the fused kernels
read them twice in all.
"""
from __future__ import annotations

import torch

from ._args import OUTSIDE, CombineArgs
from ._stats import CombineStats
from .reference import ZERO_REL, acc_dtype, clip_coefficient, group_stats

_HALF = (torch.float16, torch.bfloat16)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dtype in _HALF:  # a half dot would accumulate in half; fp32 misses 1e-5 at 1M
        x, y = x.double(), y.double()
    return torch.dot(x.view(-1), y.view(-1))


def combine_foreach(args: CombineArgs) -> CombineStats:
    a, b, out = args.grads_mm, args.grads_uni, args.out
    device = out[0].device
    # dot (MKL's SIMD sdot) is both faster and more accurate here than _foreach_norm,
    # whose fp32 sum of a million squares is off by about 1e-5.
    aa = torch.stack([_dot(x, x) for x in a]).double()
    bb = torch.stack([_dot(y, y) for y in b]).double()
    ab = torch.stack([_dot(x, y) for x, y in zip(a, b)]).double()
    # A non-finite element makes its fp32 square-sum non-finite; so does |x| > 1.8e19
    # (documented: this path may flag such overflowing gradients as non-finite).
    all_finite = torch.isfinite(aa).all() & torch.isfinite(bb).all()

    groups = torch.tensor(args.groups, device=device)
    inside = groups != OUTSIDE
    per_tensor = torch.stack([aa, ab, bb], dim=1)
    gram = torch.zeros(args.num_groups, 3, dtype=torch.float64, device=device)
    gram.index_add_(0, groups.clamp(min=0), per_tensor * inside[:, None])
    stats = group_stats(args.method, gram, args.alpha, None, None, all_finite)

    if args.method == "mmpareto":
        g = groups.clamp(min=0)
        w = stats.w_mm[g] if args.num_groups else torch.zeros_like(aa)
        u = 1 - w
        nn = (4 * (w * w * aa + 2 * w * u * ab + u * u * bb)).clamp(min=0)
        ss = (aa + 2 * ab + bb).clamp(min=0)
        zero = nn <= ZERO_REL * 4 * (w * w * aa + u * u * bb)
        s = torch.where(zero, 0.0, args.gamma * (ss.sqrt() / nn.sqrt()).clamp(min=1.0))
        ca = torch.where(inside, 2 * s * w, 1.0)
        cb = torch.where(inside, 2 * s * u, 1.0)
        for t in range(len(out)):
            _axpby(out[t], a[t], b[t], ca[t], cb[t])
    else:
        for t in range(len(out)):
            if args.method == "sum":
                torch.add(a[t], b[t], out=out[t])
            elif args.fusion[t]:
                if out[t] is not a[t]:
                    out[t].copy_(a[t])
            elif args.groups[t] != OUTSIDE:
                torch.mul(b[t], args.alpha, out=out[t])
            else:
                torch.add(a[t], b[t], alpha=args.alpha, out=out[t])

    total_norm = torch.stack([_dot(o, o) for o in out]).double().sum().sqrt()
    clip_coef = clip_coefficient(total_norm, args.max_norm)
    if args.max_norm is not None:
        torch._foreach_mul_(out, clip_coef.to(acc_dtype(out[0].dtype)))
    return stats._replace(total_norm=total_norm, clip_coef=clip_coef)


def _axpby(o, a, b, ca, cb) -> None:
    """o = ca*a + cb*b with device scalars; o may be a or b."""
    ca, cb = ca.to(acc_dtype(o.dtype)), cb.to(acc_dtype(o.dtype))
    if o.dtype in _HALF:
        o.copy_(a.float() * ca + b.float() * cb)
    elif o is b:
        o.mul_(cb).addcmul_(a, ca)
    else:
        torch.mul(a, ca, out=o)
        o.addcmul_(b, cb)
