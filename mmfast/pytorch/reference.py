"""The pure-PyTorch reference: docs/semantics.md transcribed, readable, slow on purpose.

It is the oracle every other backend is tested against and the "reference"
baseline of the benchmarks. Like the published loops it clones and concatenates
each group's gradients and walks the tensors in a Python loop; unlike them it never
asks the host for a value (``torch.where`` instead of ``if``). All its maths is fp64
(docs/semantics.md, Precision): the inputs are upcast, the result is rounded once to the
gradient's dtype.
"""
from __future__ import annotations

import torch

from ..ops import OUTSIDE, CombineArgs, CombineStats

# --- Precision rules shared by every backend ------------------------------------------
#
# Elements per chunk: the unit of parallel work of the fused kernels (cpu, cuda,
# triton); per-chunk partial sums are added per tensor in chunk order. The same value
# in csrc/precision.h (a test checks).
CHUNK = 1 << 15
# The pure-PyTorch paths (this file, foreach.py) take fp64 dots over slices this long,
# which bounds both their temporary memory and their summation depth.
SLICE = 1 << 16

# The zero rule (docs/semantics.md: g_t = 0 only where n_t is zero up to the rounding of its
# fp64 terms). Derivation, written once here (csrc/precision.h has the same constant):
#
# * Every backend forms the products a_i*b_i of a tensor exactly or in fp64 and sums
#   them in fp64 with a summation depth D (the most additions one product goes
#   through) below 2^16 + 2^15 for tensors of fewer than 2^31 elements: the cpu kernel
#   64 per fp64 lane in a 1024-element block + 4 (lanes) + 32 (blocks per chunk) +
#   numel / CHUNK (chunks, in order) <= 2^16 + 100; cuda and triton likewise within a
#   chunk (<= 128) plus numel / CHUNK; this file and foreach.py any order within a SLICE
#   (< 2^16) plus numel / SLICE slices (< 2^15).
# * So each per-tensor Gram term is within gamma_D * sum_i |x_i y_i| of its exact value
#   (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5 / 4.4),
#   gamma_D = D u / (1 - D u), u = 2^-53.
# * ||n_t||^2 = 4(w^2 aa + 2 w v ab + v^2 bb) (v = 1 - w), evaluated from those terms
#   with given fp64 w, v, adds at most 4 roundings per term. By Cauchy-Schwarz,
#   sum |a_i b_i| <= sqrt(aa bb), so every error above is bounded by
#   gamma_{D+4} * T_t with T_t = 4 (w sqrt(aa) + v sqrt(bb))^2.
# * Hence a computed ||n_t||^2 <= ZERO_TOL * T_t, with ZERO_TOL = 2^17 u = 2^-36
#   (about 1.5e-11), is indistinguishable from 0: g_t = 0 there, and only there.
#   In words: ||n_t|| below 3.8e-6 of 2(w||a_t|| + v||b_t||). (A fixed relative rule
#   used to zero the strong-conflict updates that MMPareto exists for.)
# * T_t must be finite: an Inf or NaN Gram term propagates (docs/semantics.md, non-finite).
ZERO_TOL = 2.0**-36


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the maths on gradients of ``dtype``: fp64 (docs/semantics.md, Precision)."""
    return torch.float64


def dot64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``<x, y>`` in fp64 (0-dim tensor): products exact (inputs of 53 bits or fewer),
    fp64 dots over slices of ``SLICE`` elements, then the slices summed in order."""
    x, y = x.reshape(-1), y.reshape(-1)
    if x.numel() <= SLICE:
        return torch.dot(x.double(), y.double())
    parts = [torch.dot(xs.double(), ys.double()) for xs, ys in zip(x.split(SLICE), y.split(SLICE))]
    return torch.stack(parts).sum()


def mmpareto_scale(aa, ab, bb, w, v, gamma: float):
    """``s_t`` with ``g_t = s_t n_t`` (docs/semantics.md, steps 4-5), elementwise on fp64 tensors.

    ``s = gamma * max(||a+b|| / ||n||, 1)``, or 0 where ``n_t`` is zero by the rule above.
    NaN propagates (``clamp`` keeps it; no comparison drops it).
    """
    nn = 4 * (w * w * aa + 2 * w * v * ab + v * v * bb)
    ss = (aa + 2 * ab + bb).clamp(min=0)
    zero = is_zero_norm(nn, 4 * (w * aa.sqrt() + v * bb.sqrt()) ** 2)
    ratio = ss.sqrt() / nn.clamp(min=0).sqrt()
    return torch.where(zero, 0.0, gamma * ratio.clamp(min=1.0))


def is_zero_norm(nn: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """The zero rule: ``nn`` (a squared norm from fp64 Gram terms) is 0 up to rounding,
    given ``terms`` = the squared sum of its terms' magnitudes (finite: NaN/Inf propagate)."""
    return (nn <= ZERO_TOL * terms) & (terms <= torch.finfo(torch.float64).max)


def mmpareto_weights(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_mm, conflict)`` per group from ``gram[G, 3] = (AA, AB, BB)`` (docs/semantics.md, step 2).

    ``conflict`` is ``not AB > 0`` (the published ``cos > 0`` test): a NaN is a conflict.
    """
    aa, ab, bb = gram.unbind(-1)
    conflict = ~(ab > 0)
    closed_form = (bb - ab) / (aa + bb - 2 * ab)  # only selected where the denominator is > 0
    w = torch.where(ab >= aa, 0.999, torch.where(ab >= bb, 0.001, closed_form))
    return torch.where(conflict, w, torch.full_like(w, 0.5)), conflict


def cosine(gram: torch.Tensor) -> torch.Tensor:
    """Cosine per group, 0 where either gradient is all zeros (NaN propagates)."""
    aa, ab, bb = gram.unbind(-1)
    denom = aa.sqrt() * bb.sqrt()
    return torch.where(denom == 0, torch.zeros_like(ab), ab / denom)


def clip_coefficient(total_norm: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """As ``torch.nn.utils.clip_grad_norm_``: ``min(1, max_norm / (total + 1e-6))``; NaN stays NaN."""
    if max_norm is None:
        return torch.ones_like(total_norm)
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


def scale_(grads: list, coef: torch.Tensor) -> None:
    """Multiplies each gradient by ``coef`` as stored, in at least fp32 (as the kernels:
    ``grad.mul_(coef.to(bf16))`` would round the coefficient to 8 bits)."""
    for dtype, c in ((torch.float64, coef), (torch.float32, coef.float())):
        same = [g for g in grads if g.dtype == dtype]
        if same:
            torch._foreach_mul_(same, c)
    for g in grads:
        if g.dtype in (torch.float16, torch.bfloat16):
            g.copy_(g.float() * coef.float())


def group_stats(method: str, gram, alpha: float, total_norm, clip_coef, all_finite, empty=None) -> CombineStats:
    """Assembles ``CombineStats`` from the per-group Gram; shared by the PyTorch paths.

    ``empty`` (bool ``[G]``, optional) marks group ids no tensor uses: their statistics
    are neutral (Gram 0, cosine 0, no conflict, MMPareto weights 0.5 / 0.5).
    """
    w_mm, conflict = mmpareto_weights(gram)
    if empty is not None:
        conflict = conflict & ~empty
        w_mm = torch.where(empty, 0.5, w_mm)
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
    groups = args.groups
    a_list = [x.detach().clone().double() for x in args.grads_mm]  # clones, as the published loop
    b_list = [y.detach().clone().double() for y in args.grads_uni]
    device = a_list[0].device
    f64 = dict(dtype=torch.float64, device=device)
    all_finite = torch.stack([torch.isfinite(x).all() for x in a_list + b_list]).all()

    # Per group: flatten, concatenate, dot products (as the published loop).
    gram = torch.zeros(args.num_groups, 3, **f64)
    empty = torch.ones(args.num_groups, dtype=torch.bool, device=device)
    for g in range(args.num_groups):
        members = [t for t in range(len(a_list)) if groups[t] == g]
        if not members:
            continue
        empty[g] = False
        a_cat = torch.cat([a_list[t].reshape(-1) for t in members])
        b_cat = torch.cat([b_list[t].reshape(-1) for t in members])
        gram[g] = torch.stack([dot64(a_cat, a_cat), dot64(a_cat, b_cat), dot64(b_cat, b_cat)])
    stats = group_stats(args.method, gram, args.alpha, None, None, all_finite, empty)

    # Per tensor: the combined gradient in fp64, kept until clipping knows the total norm.
    combined = []
    for t, (a, b) in enumerate(zip(a_list, b_list)):
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
            w_mm, w_uni = stats.w_mm[g], stats.w_uni[g]
            n = 2 * w_mm * a + 2 * w_uni * b
            s = mmpareto_scale(dot64(a, a), dot64(a, b), dot64(b, b), w_mm, w_uni, args.gamma)
            out = s * n
        combined.append(out)

    total_sq = sum((dot64(c, c) for c in combined), torch.zeros((), **f64))
    total_norm = total_sq.sqrt()
    clip_coef = clip_coefficient(total_norm, args.max_norm)
    for dst, c in zip(args.out, combined):
        dst.copy_(c)
    if args.max_norm is not None:
        scale_(args.out, clip_coef)
    return stats._replace(total_norm=total_norm, clip_coef=clip_coef)
