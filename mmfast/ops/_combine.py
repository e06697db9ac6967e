"""``mmfast.combine_``: the public in-place op, dispatched to a backend."""
from __future__ import annotations

import torch

from ._args import explain, first_device, parse_combine_args
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
    """Combines per-objective gradients into ``out``, in place, as docs/semantics.md defines.

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


def combine_checked_(out: list, grads_mm: list, grads_uni: list, groups: list, *, gamma: float,
                     backend: str | None) -> CombineStats:
    """MMPareto for the training helpers, which build plain lists of tensors and int group
    ids themselves and checked ``gamma`` and ``backend`` once, at construction: the Python
    argument parsing is skipped. The tensors are still checked, once per layout, by the
    operator (cpu, cuda: csrc/args.h) or by ``check_tensors`` (the other backends)."""
    with torch.no_grad():
        name = select_backend(backend, out[0].device)
        if name in ("cpu", "cuda"):
            from ._args import CombineArgs

            return _run_op(CombineArgs(out, grads_mm, grads_uni, "mmpareto", groups, 0, [], gamma, 1.0, None))
        args = parse_combine_args(out, grads_mm, grads_uni, method="mmpareto", groups=groups, gamma=gamma, alpha=1.0,
                                  fusion=None, max_norm=None)
        return _RUN[name](args)


# --------------------------------------------------------------- the two passes
# combine_ (MMPareto) is a Gram pass giving per-tensor fp64 sums, then a combine pass
# that needs only those sums: callers holding shards of each tensor (FSDP2,
# mmfast/_sharded.py) run the first on their local shards, all-reduce the [T, 4] sums,
# and run the second. Private: the contract is combine_'s, on the cpu and cuda backends.


def gram_pass(grads_mm: list, grads_uni: list) -> torch.Tensor:
    """``[T, 4]`` float64 per tensor: ``(aa, ab, bb, nonfinite)``, the last 1.0 where a value
    read was not finite (0.0 else; a sum across shards is still 0 only if all were finite)."""
    with torch.no_grad():
        op = torch.ops.mmfast.gram_.default
        try:
            return op(grads_mm, grads_uni)
        except (TypeError, RuntimeError) as e:
            explain(["grads_mm", "grads_uni"], [grads_mm, grads_uni], 0, None, None, e)


def combine_pass_(out: list, grads_mm: list, grads_uni: list, per_tensor: torch.Tensor, groups: list, *,
                  gamma: float = 1.5):
    """MMPareto's combine from per-tensor sums ``per_tensor`` (``gram_pass``'s, summed over
    shards): writes ``out``; returns ``(stats, out_sq)`` where ``stats`` is a
    ``CombineStats`` whose ``total_norm`` is this call's (local) norm, ``clip_coef`` 1,
    ``all_finite`` from ``per_tensor``, and ``out_sq`` the ``[T]`` float64 squared norms of
    ``out`` per tensor (sum them across shards for the global norm)."""
    with torch.no_grad():
        try:
            gram, cos, weights, conflict, out_sq = torch.ops.mmfast.combine_pass_.default(
                out, grads_mm, grads_uni, per_tensor, groups, float(gamma))
        except (TypeError, RuntimeError) as e:
            explain(["out", "grads_mm", "grads_uni"], [out, grads_mm, grads_uni], 1, groups, None, e)
        total = out_sq.sum().sqrt()
        stats = CombineStats(gram, cos, weights[:, 0], weights[:, 1], conflict, total, torch.ones_like(total),
                             per_tensor[:, 3].sum() == 0)
        return stats, out_sq
