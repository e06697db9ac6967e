"""``mmfast.clip_grad_norm_``: the total-norm clip of a tensor list, fused on CPU."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._args import OUTSIDE, _real, _tensor_list
from ._backends import select_backend


class ClipStats(NamedTuple):
    """``group_sq[G]``: squared norm per group; ``total_norm``, ``clip_coef``, ``all_finite``: as CombineStats."""

    group_sq: torch.Tensor
    total_norm: torch.Tensor
    clip_coef: torch.Tensor
    all_finite: torch.Tensor


def clip_grad_norm_(grads, max_norm: float | None, *, groups=None, backend: str | None = None) -> ClipStats:
    """Scales ``grads`` in place so their total L2 norm is at most ``max_norm``.

    Same rule as ``torch.nn.utils.clip_grad_norm_``:
    ``coef = min(1, max_norm / (total + 1e-6))``; ``max_norm=None`` only measures.
    ``groups`` (one id per tensor, -1 for none) adds per-group squared norms. No
    host synchronisation; on the ``cpu`` backend the tensors are read once and
    written only when the clip bites.
    """
    grads = _tensor_list("grads", grads)
    if not grads:
        raise ValueError("grads: expected at least one tensor, got an empty list")
    device = grads[0].device
    for i, g in enumerate(grads):
        if g.device != device:
            raise ValueError(f"grads[{i}]: expected device {device} (as grads[0]), got {g.device}")
        if not g.is_contiguous():
            raise ValueError(f"grads[{i}]: expected a contiguous tensor (call .contiguous() first)")
        if not g.is_floating_point():
            raise TypeError(f"grads[{i}]: expected a floating dtype, got {g.dtype}")
    groups = [OUTSIDE] * len(grads) if groups is None else list(groups)
    if len(groups) != len(grads):
        raise ValueError(f"groups: expected {len(grads)} entries (one per tensor), got {len(groups)}")
    max_norm = None if max_norm is None else _real("max_norm", max_norm, positive=True)
    name = select_backend(backend, device)
    with torch.no_grad():
        if name in ("cpu", "cuda"):
            return ClipStats(*torch.ops.mmfast.clip_(grads, groups, max_norm))
        return _clip_torch(grads, groups, max_norm)


def _clip_torch(grads, groups, max_norm) -> ClipStats:
    sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]).square()
    num_groups = max(groups) + 1 if groups else 0
    idx = torch.tensor(groups, device=sq.device)
    group_sq = torch.zeros(num_groups, dtype=torch.float64, device=sq.device)
    group_sq.index_add_(0, idx.clamp(min=0), sq * (idx != OUTSIDE))
    total = sq.sum().sqrt()
    coef = torch.ones_like(total) if max_norm is None else (max_norm / (total + 1e-6)).clamp(max=1.0)
    if max_norm is not None:
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return ClipStats(group_sq, total, coef, torch.isfinite(sq).all())
