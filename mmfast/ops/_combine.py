"""``mmfast.combine_``: the public in-place op, dispatched to a backend."""
from __future__ import annotations

import torch

from ._args import first_device, parse_combine_args
from ._backends import select_backend
from ._stats import CombineStats


def combine_(
    out,
    grads_mm,
    grads_uni,
    *,
    method: str = "mmpareto",
    groups=None,
    gamma: float = 1.5,
    alpha: float = 1.0,
    fusion=None,
    max_norm: float | None = None,
    backend: str | None = None,
) -> CombineStats:
    """Combines per-objective gradients into ``out``, in place, as SEMANTICS.md defines.

    Args:
        out, grads_mm, grads_uni: equal-length lists of contiguous tensors (or three
            tensors) with matching shapes, dtypes and devices per index. ``grads_mm[t]``
            is the gradient of the multimodal loss, ``grads_uni[t]`` that of the
            unimodal loss of tensor t's group (the sum of the unimodal losses for a
            tensor outside every group). ``out`` may be ``grads_mm`` or ``grads_uni``.
        method: ``"mmpareto"``, ``"dgl"`` or ``"sum"`` (the uniform baseline).
        groups: one group id per tensor, ``-1`` for a tensor outside every group
            (it gets the plain sum). Default: every tensor in group 0.
        gamma: MMPareto's magnitude factor.
        alpha: DGL's factor on the unimodal gradient.
        fusion: DGL only, one bool per tensor: True for the fusion module's tensors
            (they take only the multimodal gradient).
        max_norm: clip the combined gradients to this total L2 norm, as
            ``torch.nn.utils.clip_grad_norm_`` would.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"``, ``"foreach"``, ``"torch"`` or None
            for the best available one (``mmfast.backends()``).

    Returns:
        ``CombineStats`` of device tensors; nothing here synchronises the host.
        If an input is not finite, ``stats.all_finite`` is False and ``out`` holds
        what the formulas give (NaN/Inf propagate): skip that step.
    """
    with torch.no_grad():
        if backend is None or backend in ("cpu", "cuda"):
            # The operator checks the tensors itself, in C++ (mmfast/_args.py).
            args = parse_combine_args(out, grads_mm, grads_uni, method=method, groups=groups, gamma=gamma,
                                      alpha=alpha, fusion=fusion, max_norm=max_norm, tensors=False)
            name = select_backend(backend, first_device("out", args.out))
            if name in ("cpu", "cuda"):
                return _run_op(args)
            args = parse_combine_args(args.out, args.grads_mm, args.grads_uni, method=method, groups=args.groups,
                                      gamma=gamma, alpha=alpha, fusion=fusion, max_norm=max_norm)
        else:
            args = parse_combine_args(out, grads_mm, grads_uni, method=method, groups=groups, gamma=gamma,
                                      alpha=alpha, fusion=fusion, max_norm=max_norm)
            name = select_backend(backend, args.out[0].device)
        return _RUN[name](args)


def _run_torch(args):
    from ..pytorch.reference import combine_reference

    return combine_reference(args)


def _run_foreach(args):
    from ..pytorch.foreach import combine_foreach

    return combine_foreach(args)


def _run_op(args):
    from ._ops import call_op

    return call_op(args)


def _run_triton(args):
    from ..kernels.combine import combine_triton

    return combine_triton(args)


_RUN = {"torch": _run_torch, "foreach": _run_foreach, "cpu": _run_op, "cuda": _run_op, "triton": _run_triton}
