"""``mmfast.MMPareto``: the MMPareto training step in two backward passes.

    mmp = mmfast.MMPareto({"audio": model.audio_net, "visual": model.visual_net})
    optimizer.zero_grad()  # the groups' gradients are reset by backward; the rest accumulate
    out, out_a, out_v = model(x_a, x_v)
    stats = mmp.backward(loss_mm, {"audio": loss_a, "visual": loss_v})
    optimizer.step()

Pass 1 backpropagates the multimodal loss with each group's ``.grad`` pointing
into one flat buffer ``A``; pass 2 the sum of the unimodal losses into a second
flat buffer ``B``. One fused combine over both buffers writes the MMPareto update
into ``A`` (the norm of ``a + b`` comes from its Gram pass, so the published
fourth backward is not needed), and ``.grad`` stays a view of ``A``. Parameters
outside the groups accumulate the plain sum, as after ``(L_mm + Σ L_m).backward()``.
"""
from __future__ import annotations

import torch

from ._combine import combine_
from ._dist import GradSync
from ._graph import reachable_leaves
from ._helper import GroupHelper
from ._stats import CombineStats


class MMPareto(GroupHelper):
    """MMPareto (Wei & Hu, ICML 2024) as a two-pass backward.

    Args:
        groups: ``{name: encoder module or iterable of parameters}``, one per modality.
        gamma: magnitude factor (SEMANTICS.md).
        per_loss_backward: run one backward per unimodal loss instead of one for
            their sum. Needed only when a unimodal loss reaches another group's
            parameters, which the first ``backward`` checks and reports.
        backend: passed to ``combine_`` (None: the best available).
        process_group: average the gradients over this ``torch.distributed`` group
            (each per-objective buffer before the Gram pass, the rest as DDP would).
        ddp: the ``DistributedDataParallel`` model, if any: its reducer is switched
            off (``require_backward_grad_sync = False``) and mmfast communicates.
    """

    def __init__(self, groups: dict, *, gamma: float = 1.5, per_loss_backward: bool = False, backend=None,
                 process_group=None, ddp=None):
        super().__init__(groups, n_buffers=2, backend=backend)
        self.gamma = gamma
        self.per_loss_backward = per_loss_backward
        self.sync = GradSync(process_group, ddp, owner="mmfast.MMPareto")
        self._others = None  # per unimodal loss, the leaves outside every group it reaches
        self._rest = None  # every leaf outside the groups that a loss reaches

    def backward(self, loss_mm: torch.Tensor, losses: dict) -> CombineStats:
        """Both backward passes and the combine; every ``.grad`` is then ready for the optimizer."""
        unimodal = self.check_losses(loss_mm, losses)
        self.begin()
        if self._others is None:  # first step: read the graph once
            leaves = [reachable_leaves(loss) for loss in unimodal]
            if not self.per_loss_backward:
                self.check_disjoint(leaves)
            self._others = [[t for pid, t in lv.items() if pid not in self.group_of] for lv in leaves]
            self._rest = self.outside_leaves([loss_mm, *unimodal])

        for f in self.flat:
            f.attach(0, zero=True)
        loss_mm.backward(retain_graph=True)
        for f in self.flat:
            f.attach(1, zero=True)
        if self.per_loss_backward:
            for m, loss in enumerate(unimodal):
                inputs = self.flat[m].params + self._others[m]
                torch.autograd.backward(loss, inputs=inputs, retain_graph=m + 1 < len(unimodal))
        else:
            torch.stack([loss.reshape(()) for loss in unimodal]).sum().backward()

        if self.sync.active:
            for f in self.flat:
                self.sync.mean_(f.buffers, f"group {f.name!r}'s gradient buffers")
            self.sync.mean_([t.grad for t in self._rest if t.grad is not None], "the gradients outside the groups")
        a = [v for f in self.flat for v in f.views[0]]
        b = [v for f in self.flat for v in f.views[1]]
        stats = combine_(a, a, b, groups=self.group_ids, gamma=self.gamma, backend=self.backend)
        for f in self.flat:
            f.attach(0)
        self.finish()
        return stats._replace(names=tuple(self.names))
