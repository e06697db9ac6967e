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

from ._args import CombineArgs
from ._device_math import MODE_A, MODE_B, group_sums, mmpareto_coefficients, role_coefficients
from ._stats import CombineStats
from .reference import acc_dtype, clip_coefficient, group_stats

_HALF = (torch.float16, torch.bfloat16)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dtype in _HALF:  # a half dot would accumulate in half; fp32 misses 1e-5 at 1M
        x, y = x.double(), y.double()
    return torch.dot(x.view(-1), y.view(-1))


def combine_foreach(args: CombineArgs) -> CombineStats:
    a, b, out = args.grads_mm, args.grads_uni, args.out
    # dot (MKL's SIMD sdot) is both faster and more accurate here than _foreach_norm,
    # whose fp32 sum of a million squares is off by about 1e-5.
    aa = torch.stack([_dot(x, x) for x in a]).double()
    bb = torch.stack([_dot(y, y) for y in b]).double()
    ab = torch.stack([_dot(x, y) for x, y in zip(a, b)]).double()
    # A non-finite element makes its fp32 square-sum non-finite; so does |x| > 1.8e19
    # (documented: this path may flag such overflowing gradients as non-finite).
    all_finite = torch.isfinite(aa).all() & torch.isfinite(bb).all()

    per_tensor = torch.stack([aa, ab, bb], dim=1)
    gram = group_sums(per_tensor, args.groups, args.num_groups)
    stats = group_stats(args.method, gram, args.alpha, None, None, all_finite)

    if args.method == "mmpareto":
        ca, cb = mmpareto_coefficients(per_tensor, stats.w_mm, args)
        for t in range(len(out)):
            _axpby(out[t], a[t], b[t], ca[t], cb[t])
    else:
        ca, cb, mode = role_coefficients(args)
        for t in range(len(out)):
            if mode[t] == MODE_A:
                if out[t] is not a[t]:
                    out[t].copy_(a[t])
            elif mode[t] == MODE_B:
                torch.mul(b[t], cb[t], out=out[t])
            else:
                torch.add(a[t], b[t], alpha=cb[t], out=out[t])

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
