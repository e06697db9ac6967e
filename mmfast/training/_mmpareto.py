"""``mmfast.MMPareto``: the MMPareto training step in two backward passes.

    mmp = mmfast.MMPareto({"audio": model.audio_net, "visual": model.visual_net})
    optimizer.zero_grad()
    out, out_a, out_v = model(x_a, x_v)
    stats = mmp.backward(loss_mm, {"audio": loss_a, "visual": loss_v})
    optimizer.step()

Pass 1 backpropagates the multimodal loss, pass 2 the sum of the unimodal losses; the
groups' ``.grad`` is taken out before each, so autograd hands over ``a`` and ``b`` as
fresh tensors. One fused combine writes the MMPareto update into ``a`` (the norm of
``a + b`` comes from its Gram pass, so the published fourth backward is not needed),
which is added to what ``.grad`` held (or becomes ``.grad``). Parameters outside the
groups accumulate the plain sum, as after ``(L_mm + Σ L_m).backward()``.
"""
from __future__ import annotations

import torch

from ..ops import CombineStats, combine_checked_
from ._helper import GroupHelper, apply_update, check_number
from ._sharded import combine_sharded_, is_sharded


class MMPareto(GroupHelper):
    """MMPareto (Wei & Hu, ICML 2024) as a two-pass backward.

    Args:
        groups: ``{name: encoder module or iterable of parameters}``, one per modality.
            Modules are looked up at every ``backward`` (freezing, unfreezing and
            replaced parameters are followed); a list of parameters is fixed.
        gamma: magnitude factor (docs/semantics.md).
        per_loss_backward: run one backward per unimodal loss instead of one for
            their sum. Needed only when a unimodal loss reaches another group's
            parameters, which every ``backward`` checks on that step's graph.
        backend: passed to ``combine_`` (None: the best available).
        process_group: average the gradients over this ``torch.distributed`` group
            (each objective's group gradients before the Gram pass, the rest as DDP would).
        ddp: the ``DistributedDataParallel`` model, if any: its reducer is switched
            off (``require_backward_grad_sync = False``) and mmfast communicates.
    """

    owner = "mmfast.MMPareto"

    def __init__(self, groups: dict, *, gamma: float = 1.5, per_loss_backward: bool = False, backend=None,
                 process_group=None, ddp=None):
        self.gamma = check_number("gamma", gamma, low=0.0, strict=True)
        if not isinstance(per_loss_backward, bool):
            raise TypeError(f"per_loss_backward: expected a bool, got {type(per_loss_backward).__name__}")
        self.per_loss_backward = per_loss_backward
        super().__init__(groups, backend=backend, process_group=process_group, ddp=ddp)

    def backward(self, loss_mm: torch.Tensor, losses: dict, *, combine: bool = True) -> CombineStats | None:
        """Both backward passes and the combine; every ``.grad`` is then ready for the optimizer.

        ``combine=False`` (the global-batch form of accumulation): only accumulate the
        raw per-objective gradients of the groups; the next ``backward`` with
        ``combine=True`` combines the sums, so k micro-batches give what one batch k
        times as large gives. Returns None then. Without it, each ``backward`` adds its
        own combined update to ``.grad`` (as ``loss.backward()`` adds its gradient).
        """
        unimodal = self.check_losses(loss_mm, losses)
        lay = self.groups.resolve()
        r_uni = self.read_graph(unimodal)
        if not self.per_loss_backward:
            self.check_disjoint(lay, r_uni)
        # The multimodal loss's graph (the largest) is read only where it is needed: to
        # know when each gradient is final across ranks, or when no unimodal loss reaches
        # a group (is the helper built for another model?).
        need_mm = self.sync.active or not any(pid in lay.group_of for r in r_uni for pid in r.leaves)
        reaches = [*self.read_graph([loss_mm]), *r_uni] if need_mm else r_uni
        self.check_reaches_groups(lay, reaches)
        self.note_window(reaches)

        params = lay.params
        acc = self.take_accumulated(params)  # before .grad is touched: it checks .grad
        prev = self.take_grads(params)
        if self.per_loss_backward:  # each unimodal loss to its own group's leaves and those outside
            uni = [(loss, [t for pid, t in r.leaves.items() if lay.group_of.get(pid, m) == m])
                   for m, (loss, r) in enumerate(zip(unimodal, r_uni))]
        else:
            uni = [(_sum(unimodal), None)]
        passes = [([(loss_mm, None)], reaches[0].leaves if need_mm else ()),
                  (uni, {pid for r in r_uni for pid in r.leaves})]
        try:
            a, b = self.run_passes(lay, passes, collect=params, acc=acc, combine=combine)
        except BaseException:
            for p, g in zip(params, prev):
                p.grad = g
            raise
        if not combine:
            self.accumulate(params, [a, b], prev)
            return None
        if not self._in_no_sync:
            self.end_step()
        stats, present = apply_update(params, lay.group_ids, [a, b], prev, self.names, self._combine)
        return (stats or empty_stats())._replace(names=present)


    def _combine(self, g: list, ids: list):
        if any(is_sharded(x) for x in g[0]):  # FSDP2: local shards, Gram terms summed across them
            return combine_sharded_(g[0], g[1], ids, gamma=self.gamma, owner=self.owner)
        # gamma and backend were checked at construction, the lists and ids are built here:
        # no Python argument parsing; the tensors are checked once per layout (C++).
        return combine_checked_(g[0], g[0], g[1], ids, gamma=self.gamma, backend=self.backend)


def _sum(losses: list):
    live = [loss for loss in losses if loss.requires_grad]
    total = live[0] if live else losses[0]
    for loss in live[1:]:
        total = total + loss
    return total


def empty_stats() -> CombineStats:
    f64 = dict(dtype=torch.float64)
    return CombineStats(torch.zeros(0, 3, **f64), torch.zeros(0, **f64), torch.zeros(0, **f64),
                        torch.zeros(0, **f64), torch.zeros(0, dtype=torch.bool), torch.zeros((), **f64),
                        torch.ones((), **f64), torch.ones((), dtype=torch.bool))
