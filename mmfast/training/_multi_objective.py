"""``mmfast.MultiObjective``: K losses, K backward passes, one fused Gramian aggregation.

    mo = mmfast.MultiObjective({"trunk": model.trunk}, n_objectives=4, weighting="upgrad")
    optimizer.zero_grad()
    stats = mo.backward([loss_1, loss_2, loss_3, loss_4])
    optimizer.step()

Each loss is backpropagated with the groups' ``.grad`` taken out before, so autograd
hands over each objective's gradients as fresh tensors; ``mmfast.aggregate_`` writes
the aggregate into the first objective's tensors, which is added to what ``.grad``
held (or becomes ``.grad``). Parameters outside the groups (task heads) accumulate the
plain sum of the losses' gradients, as after ``sum(losses).backward()``.
"""
from __future__ import annotations

import torch

from ..ops import AggregateStats, aggregate_
from ..weightings import WEIGHTINGS
from ._helper import GroupHelper, apply_update, check_scalar
from ._sharded import aggregate_sharded_, is_sharded


def _aggregate(out, grads, groups, *, owner, **kw):
    return aggregate_(out, grads, groups=groups, **kw)


class MultiObjective(GroupHelper):
    """Gramian aggregation of K objectives (``mgda``, ``pcgrad``, ``cagrad``, ``imtlg``,
    ``upgrad``, ``mmpareto``) over the parameter groups, weights per group.

    Args:
        groups: ``{name: module or parameters}`` (shared parts, each weighted on its own;
            modules are looked up at every ``backward``).
        n_objectives: K, the number of losses ``backward`` will get.
        weighting: see ``mmfast.weightings``; extra keyword arguments go to it.
        backend: passed to ``aggregate_``.
        process_group, ddp: average each objective's gradients across ranks before the
            Gram pass (as ``mmfast.MMPareto``).
    """

    owner = "mmfast.MultiObjective"

    def __init__(self, groups: dict, n_objectives: int, *, weighting: str = "upgrad", backend=None,
                 process_group=None, ddp=None, **weighting_kw):
        if isinstance(n_objectives, bool) or not isinstance(n_objectives, int) or n_objectives < 1:
            raise ValueError(f"n_objectives: expected a positive int, got {n_objectives!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: unknown {weighting!r}; known: {', '.join(sorted(WEIGHTINGS))}")
        super().__init__(groups, backend=backend, process_group=process_group, ddp=ddp)
        self.k = n_objectives
        self.weighting = weighting
        self.weighting_kw = weighting_kw

    def backward(self, losses, *, combine: bool = True) -> AggregateStats | None:
        """K backward passes and the aggregation. ``combine=False``: the global-batch form
        of accumulation (as ``MMPareto.backward``); returns None then."""
        if not isinstance(losses, (list, tuple)) or len(losses) != self.k:
            raise ValueError(f"losses: expected a list of {self.k} scalar losses, got {type(losses).__name__} "
                             f"of length {len(losses) if hasattr(losses, '__len__') else '?'}")
        for i, loss in enumerate(losses):
            check_scalar(f"losses[{i}]", loss, need_grad=False)
        if not any(loss.requires_grad for loss in losses):
            raise ValueError("losses: none of them requires grad (computed under no_grad, or detached?)")
        lay = self.groups.resolve()
        reaches = self.read_graph(list(losses))
        self.check_reaches_groups(lay, reaches)
        self.note_window(reaches)

        params = lay.params
        acc = self.take_accumulated(params)
        prev = self.take_grads(params)
        passes = [([(loss, None)], r.leaves) for loss, r in zip(losses, reaches)]
        try:
            grads = self.run_passes(lay, passes, collect=params, acc=acc, combine=combine)
        except BaseException:
            for p, g in zip(params, prev):
                p.grad = g
            raise
        if not combine:
            self.accumulate(params, grads, prev)
            return None
        if not self._in_no_sync:
            self.end_step()
        stats, present = apply_update(
            params, lay.group_ids, grads, prev, self.names,
            lambda g, ids: (aggregate_sharded_ if any(is_sharded(x) for x in g[0]) else _aggregate)(
                g[0], g, ids, weighting=self.weighting, backend=self.backend, owner=self.owner, **self.weighting_kw))
        if stats is None:
            f64 = dict(dtype=torch.float64)
            stats = AggregateStats(torch.zeros(0, self.k, self.k, **f64), torch.zeros(0, self.k, **f64),
                                   torch.zeros((), **f64), torch.ones((), dtype=torch.bool))
        return stats._replace(names=present)
