"""The small per-tensor and per-group maths between the two passes, as device-side
torch ops (no host sync): shared by the foreach and Triton backends. The CPU
extension does the same in C++ (csrc/cpu/combine.cpp)."""
from __future__ import annotations

import torch

from ._args import OUTSIDE, CombineArgs
from .reference import ZERO_REL

# Per-tensor combine modes, as the kernels read them.
MODE_AB, MODE_A, MODE_B = 0, 1, 2


def group_sums(per_tensor: torch.Tensor, groups: list, num_groups: int) -> torch.Tensor:
    """``[G, k]`` sums of ``per_tensor[T, k]`` rows by group (OUTSIDE rows dropped).

    A gather and a sum per group rather than ``index_add_``: no atomics, so the same
    bits on every run; and unlike a one-hot matmul, a NaN stays in its own group.
    """
    rows = []
    for g in range(num_groups):
        members = [t for t, gt in enumerate(groups) if gt == g]
        idx = torch.tensor(members, dtype=torch.long).to(per_tensor.device, non_blocking=True)
        rows.append(per_tensor.index_select(0, idx).sum(0))
    if not rows:
        return per_tensor.new_zeros(0, per_tensor.shape[1])
    return torch.stack(rows)


def mmpareto_coefficients(per_tensor: torch.Tensor, w_mm: torch.Tensor, args: CombineArgs):
    """``(ca, cb)`` per tensor so that ``out_t = ca_t·a_t + cb_t·b_t`` (SEMANTICS.md, steps 3-5)."""
    aa, ab, bb = per_tensor.unbind(1)
    groups = torch.tensor(args.groups, device=per_tensor.device)
    inside = groups != OUTSIDE
    w = w_mm[groups.clamp(min=0)] if args.num_groups else torch.zeros_like(aa)
    u = 1 - w
    nn = (4 * (w * w * aa + 2 * w * u * ab + u * u * bb)).clamp(min=0)
    ss = (aa + 2 * ab + bb).clamp(min=0)
    zero = nn <= ZERO_REL * 4 * (w * w * aa + u * u * bb)
    s = torch.where(zero, 0.0, args.gamma * (ss.sqrt() / nn.sqrt()).clamp(min=1.0))
    return torch.where(inside, 2 * s * w, 1.0), torch.where(inside, 2 * s * u, 1.0)


def role_coefficients(args: CombineArgs) -> tuple:
    """``(ca, cb, mode)`` lists for ``"dgl"`` and ``"sum"``: fixed by the roles, not the data."""
    ca, cb, mode = [], [], []
    for t, g in enumerate(args.groups):
        if args.method == "sum":
            k = (1.0, 1.0, MODE_AB)
        elif args.fusion[t]:
            k = (1.0, 0.0, MODE_A)
        elif g != OUTSIDE:
            k = (0.0, args.alpha, MODE_B)
        else:
            k = (1.0, args.alpha, MODE_AB)
        ca.append(k[0])
        cb.append(k[1])
        mode.append(k[2])
    return ca, cb, mode
