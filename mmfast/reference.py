"""The pure-PyTorch reference: SEMANTICS.md transcribed, readable, slow on purpose.

It is the oracle every other backend is tested against and the "reference"
baseline of the benchmarks. Like the published loops it clones and concatenates
each group's gradients and walks the tensors in a Python loop; unlike them it never
asks the host for a value (``torch.where`` instead of ``if``).
"""
from __future__ import annotations

import torch

from ._args import OUTSIDE, CombineArgs
from ._stats import CombineStats


# ||n_t||^2 below this fraction of 4*(w_mm^2*||a_t||^2 + w_uni^2*||b_t||^2) is rounding
# noise of a cancellation (a_t and b_t antiparallel): n_t counts as zero, g_t = 0.
ZERO_REL = 1e-6


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are accumulated in fp32; fp32 and fp64 in themselves."""
    return torch.promote_types(dtype, torch.float32)


def mmpareto_weights(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_mm, conflict)`` per group from ``gram[G, 3] = (AA, AB, BB)`` (SEMANTICS.md, step 2)."""
    aa, ab, bb = gram.unbind(-1)
    conflict = ab <= 0
    closed_form = (bb - ab) / (aa + bb - 2 * ab)  # only selected where the denominator is > 0
    w = torch.where(ab >= aa, 0.999, torch.where(ab >= bb, 0.001, closed_form))
    return torch.where(conflict, w, torch.full_like(w, 0.5)), conflict


def cosine(gram: torch.Tensor) -> torch.Tensor:
    """Cosine per group, 0 where either gradient is all zeros."""
    aa, ab, bb = gram.unbind(-1)
    denom = aa.sqrt() * bb.sqrt()
    return torch.where(denom > 0, ab / denom, torch.zeros_like(ab))


def clip_coefficient(total_norm: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """As ``torch.nn.utils.clip_grad_norm_``: ``min(1, max_norm / (total + 1e-6))``."""
    if max_norm is None:
        return torch.ones_like(total_norm)
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


def group_stats(method: str, gram, alpha: float, total_norm, clip_coef, all_finite) -> CombineStats:
    """Assembles ``CombineStats`` from the per-group Gram; shared by the PyTorch paths."""
    w_mm, conflict = mmpareto_weights(gram)
    if method == "dgl":
        w_mm = torch.zeros_like(w_mm)
        w_uni = torch.full_like(w_mm, alpha)
    elif method == "sum":
        w_mm = torch.ones_like(w_mm)
        w_uni = torch.ones_like(w_mm)
    else:
        w_uni = 1 - w_mm
    return CombineStats(gram, cosine(gram), w_mm, w_uni, conflict, total_norm, clip_coef, all_finite)


def combine_reference(args: CombineArgs) -> CombineStats:
    a_list, b_list, groups = args.grads_mm, args.grads_uni, args.groups
    device = a_list[0].device
    f64 = dict(dtype=torch.float64, device=device)
    all_finite = torch.stack([torch.isfinite(x).all() for x in a_list + b_list]).all()

    # Per group: clone, flatten, concatenate, dot products (as the published loop).
    gram = torch.zeros(args.num_groups, 3, **f64)
    for g in range(args.num_groups):
        members = [t for t in range(len(a_list)) if groups[t] == g]
        if not members:
            continue
        acc = acc_dtype(a_list[members[0]].dtype)
        a_cat = torch.cat([a_list[t].detach().clone().reshape(-1).to(acc) for t in members])
        b_cat = torch.cat([b_list[t].detach().clone().reshape(-1).to(acc) for t in members])
        gram[g] = torch.stack([a_cat @ a_cat, a_cat @ b_cat, b_cat @ b_cat]).double()
    stats = group_stats(args.method, gram, args.alpha, None, None, all_finite)

    # Per tensor: the combined gradient, kept until clipping knows the total norm.
    combined = []
    for t, (a, b) in enumerate(zip(a_list, b_list)):
        a, b = a.to(acc_dtype(a.dtype)), b.to(acc_dtype(b.dtype))
        g = groups[t]
        if args.method == "sum":
            out = a + b
        elif args.method == "dgl":
            if args.fusion[t]:
                out = a  # the fusion module learns from the multimodal loss only
            elif g != OUTSIDE:
                out = args.alpha * b  # encoders learn from their unimodal loss only
            else:
                out = a + args.alpha * b
        elif g == OUTSIDE:
            out = a + b
        else:
            w_mm, w_uni = stats.w_mm[g].to(a.dtype), stats.w_uni[g].to(a.dtype)
            n = 2 * w_mm * a + 2 * w_uni * b
            n_norm = torch.linalg.vector_norm(n)
            ratio = torch.linalg.vector_norm(a + b) / n_norm
            terms = 4 * (w_mm**2 * a.square().sum() + w_uni**2 * b.square().sum())
            out = torch.where(n_norm**2 <= ZERO_REL * terms, torch.zeros_like(n), args.gamma * n * ratio.clamp(min=1.0))
        combined.append(out)

    total_sq = sum((torch.linalg.vector_norm(c).double() ** 2 for c in combined), torch.zeros((), **f64))
    total_norm = total_sq.sqrt()
    clip_coef = clip_coefficient(total_norm, args.max_norm)
    for dst, c in zip(args.out, combined):
        if args.max_norm is not None:
            c = c * clip_coef.to(c.dtype)
        dst.copy_(c)
    return stats._replace(total_norm=total_norm, clip_coef=clip_coef)
