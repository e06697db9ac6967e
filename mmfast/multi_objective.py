"""``mmfast.MultiObjective``: K losses, K backward passes into K flat buffers, one
fused Gramian aggregation.

    mo = mmfast.MultiObjective({"trunk": model.trunk}, weighting="upgrad")
    optimizer.zero_grad()
    stats = mo.backward([loss_1, loss_2, loss_3, loss_4])
    optimizer.step()

Each loss is backpropagated with each group's ``.grad`` pointing into its own flat
buffer (the buffers of ``mmfast.MMPareto``, K of them); ``mmfast.aggregate_``
then writes the aggregate into the first buffer, which ``.grad`` keeps viewing.
Parameters outside the groups (task heads) accumulate the plain sum of the losses'
gradients, as after ``sum(losses).backward()``.
"""
from __future__ import annotations


from ._helper import GroupHelper, _check_scalar
from ._multi import AggregateStats, aggregate_


class MultiObjective(GroupHelper):
    """Gramian aggregation of K objectives (``mgda``, ``pcgrad``, ``cagrad``, ``imtlg``,
    ``upgrad``, ``mmpareto``) over the parameter groups, weights per group.

    Args:
        groups: ``{name: module or parameters}`` (shared parts, each weighted on its own).
        n_objectives: K, the number of losses ``backward`` will get.
        weighting: see ``mmfast.weightings``; extra keyword arguments go to it.
        backend: passed to ``aggregate_``.
    """

    def __init__(self, groups: dict, n_objectives: int, *, weighting: str = "upgrad", backend=None, **weighting_kw):
        if not isinstance(n_objectives, int) or n_objectives < 1:
            raise ValueError(f"n_objectives: expected a positive int, got {n_objectives!r}")
        super().__init__(groups, n_buffers=n_objectives, backend=backend)
        self.k = n_objectives
        self.weighting = weighting
        self.weighting_kw = weighting_kw

    def backward(self, losses) -> AggregateStats:
        if not isinstance(losses, (list, tuple)) or len(losses) != self.k:
            raise ValueError(f"losses: expected a list of {self.k} scalar losses, got {type(losses).__name__} "
                             f"of length {len(losses) if hasattr(losses, '__len__') else '?'}")
        for i, loss in enumerate(losses):
            _check_scalar(f"losses[{i}]", loss)
        self.begin()
        for k, loss in enumerate(losses):
            for f in self.flat:
                f.attach(k, zero=True)
            loss.backward(retain_graph=k + 1 < self.k)
        grads = [[v for f in self.flat for v in f.views[k]] for k in range(self.k)]
        stats = aggregate_(grads[0], grads, weighting=self.weighting, groups=self.group_ids, backend=self.backend,
                           **self.weighting_kw)
        for f in self.flat:
            f.attach(0)
        self.finish()
        return stats._replace(names=tuple(self.names))
