"""``mmfast.clip_grad_norm_``: the total-norm clip of a tensor list, fused on CPU."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._args import OUTSIDE, check_tensors, explain, first_device, id_list, real, tensor_list
from ._backends import _C, select_backend


class ClipStats(NamedTuple):
    """``group_sq[G]``: squared norm per group (0 for a group id no tensor uses);
    ``total_norm``, ``clip_coef``, ``all_finite``: as CombineStats."""

    group_sq: torch.Tensor
    total_norm: torch.Tensor
    clip_coef: torch.Tensor
    all_finite: torch.Tensor


def clip_grad_norm_(grads, max_norm: float | None, *, groups=None, backend: str | None = None) -> ClipStats:
    """Scales ``grads`` in place so their total L2 norm is at most ``max_norm``.

    Same rule as ``torch.nn.utils.clip_grad_norm_``:
    ``coef = min(1, max_norm / (total + 1e-6))`` (a NaN norm gives a NaN coefficient);
    ``max_norm=None`` only measures. ``groups`` (one id per tensor, -1 for none) adds
    per-group squared norms. No host synchronisation; on the ``cpu`` backend the tensors
    are read once and written only when the clip bites. The arguments follow the
    contract of ``combine_`` (mmfast/_args.py).
    """
    grads = tensor_list("grads", grads)
    n = len(grads)
    groups = [OUTSIDE] * n if groups is None else id_list("groups", groups, n, int)
    max_norm = None if max_norm is None else real("max_norm", max_norm, positive=True)
    name = select_backend(backend, first_device("grads", grads))
    with torch.no_grad():
        if name in ("cpu", "cuda"):
            try:
                op = _CLIP if torch.compiler.is_compiling() else _FAST_CLIP  # as mmfast/_ops.py call_op
                return ClipStats(*op(grads, groups, max_norm))
            except (TypeError, RuntimeError) as e:
                explain(["grads"], [grads], 1, groups, None, e)
        num_groups = check_tensors(["grads"], [grads], 1, groups, None)
        return _clip_torch(grads, groups, num_groups, max_norm)


def _clip_torch(grads, groups, num_groups, max_norm) -> ClipStats:
    from ._device_math import group_layout
    from ..pytorch.foreach import all_finite, gram_per_tensor
    from ..pytorch.reference import clip_coefficient, scale_

    per_tensor = gram_per_tensor(grads, grads)
    sq = per_tensor[:, 0]
    lay = group_layout(groups, num_groups, None, sq.device)
    group_sq = lay.group_sums(per_tensor[:, :1])[:, 0]
    total = sq.sum().sqrt()
    coef = clip_coefficient(total, max_norm)
    if max_norm is not None:
        scale_(grads, coef)
    return ClipStats(group_sq, total, coef, all_finite(per_tensor, grads))


_CLIP = torch.ops.mmfast.clip_.default if hasattr(torch.ops.mmfast, "clip_") else None
_FAST_CLIP = None if _C is None else _C.clip_
