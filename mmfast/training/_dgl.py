"""``mmfast.DGL``: disentangled gradient learning (ICCV 2025) in two backward passes.

    dgl = mmfast.DGL({"audio": model.audio_net, "visual": model.visual_net},
                     fusion=model.fusion_module, alpha=4.0, max_norm=40.0)
    optimizer.zero_grad()
    out, out_a, out_v = model(x_a, x_v)
    stats = dgl.backward(loss_mm, {"audio": loss_a, "visual": loss_v})
    optimizer.step()

Pass 1 backpropagates ``alpha · Σ L_m`` to every leaf it reaches except the fusion
module's; pass 2 backpropagates ``L_mm`` to every leaf it reaches except the encoders'.
The masking is done by autograd itself (``backward(inputs=...)``, the leaves read off
this step's graph), so a dropped gradient is never computed, even when the model forgot
to detach; every gradient accumulates into ``.grad`` as after a plain backward. The clip
(``max_norm``) is one fused norm pass over every gradient plus a rescale pass only when
it bites, once per optimizer step: on the ``backward`` outside ``no_sync()``.
"""
from __future__ import annotations

import torch

from ..ops import DGLStats, clip_grad_norm_
from ._helper import GroupHelper, check_number, dense_1d
from ._sharded import clip_sharded_, is_sharded


class DGL(GroupHelper):
    """Encoders learn from ``alpha ·`` their unimodal loss, the fusion module from ``L_mm``.

    Args:
        groups: ``{name: encoder module or parameters}`` (looked up at every ``backward``).
        fusion: the fusion module (or its parameters).
        alpha: factor on the unimodal losses (the reference scripts use 4 or 5).
        max_norm: clip every gradient to this total norm (the reference uses 40), or None.
        backend: passed to the fused clip (None: the best available).
        process_group, ddp: average the gradients across ranks before clipping
            (as ``mmfast.MMPareto``).

    Parameters outside the groups and the fusion module get ``dL_mm/dθ + alpha ·
    dΣL_m/dθ``; which ones a loss reaches is read off each step's graph.
    """

    owner = "mmfast.DGL"

    def __init__(self, groups: dict, *, fusion, alpha: float = 4.0, max_norm: float | None = 40.0, backend=None,
                 process_group=None, ddp=None):
        self.alpha = check_number("alpha", alpha, low=0.0, strict=False)
        self.max_norm = check_number("max_norm", max_norm, low=0.0, strict=True, none=True)
        super().__init__(groups, extra={"fusion": fusion}, backend=backend, process_group=process_group, ddp=ddp)

    def backward(self, loss_mm: torch.Tensor, losses: dict) -> DGLStats | None:
        """Both passes. Outside ``no_sync()`` (the last micro-batch before the optimizer
        step) also the all-reduce across ranks and the clip of the accumulated gradients,
        and the statistics; inside it, None."""
        unimodal = self.check_losses(loss_mm, losses)
        lay = self.groups.resolve()
        fusion = {id(p) for p in lay.extra["fusion"]}
        fusion |= {k for k, v in lay.leaf.items() if id(v) in fusion}  # FSDP2: the unsharded leaves too
        r_mm, *r_uni = self.read_graph([loss_mm, *unimodal])
        self.check_reaches_groups(lay, [r_mm, *r_uni])
        self.note_window([r_mm, *r_uni])
        to_uni = {pid: t for r in r_uni for pid, t in r.leaves.items() if pid not in fusion}
        to_mm = [t for pid, t in r_mm.leaves.items() if pid not in lay.group_of]
        uni = [loss * self.alpha for loss in unimodal if loss.requires_grad]
        total = sum(uni[1:], uni[0]) if uni else loss_mm.detach()
        passes = [([(total, list(to_uni.values()))], to_uni), ([(loss_mm, to_mm)], {id(t) for t in to_mm})]
        self.run_passes(lay, passes, collect=[], acc=None, combine=True)  # (DGL is linear: it just accumulates)
        if self._in_no_sync:
            return None

        params = self.clip_params(lay)
        self.end_step()
        grads, groups = [], []
        for p in params:
            if p.grad is None:
                continue
            if is_sharded(p.grad):  # FSDP2: clipped on the local shards (below)
                grads.append(p.grad)
                groups.append(lay.group_of.get(id(p), -1))
                continue
            flat = dense_1d(p.grad)
            if flat is None:  # a rare layout: clip a contiguous copy, then write it back
                p.grad = p.grad.contiguous()
                flat = p.grad.view(-1)
            grads.append(flat)
            groups.append(lay.group_of.get(id(p), -1))
        if not grads:
            zero = torch.zeros((), dtype=torch.float64)
            return DGLStats(torch.zeros(len(self.names), dtype=torch.float64), zero, torch.ones_like(zero),
                            torch.ones((), dtype=torch.bool), tuple(self.names))
        if any(is_sharded(g) for g in grads):
            clip = clip_sharded_(grads, groups, self.max_norm, owner=self.owner)
        else:
            clip = clip_grad_norm_(grads, self.max_norm, groups=groups, backend=self.backend)
        group_sq = clip.group_sq
        if group_sq.numel() < len(self.names):  # trailing groups without gradients this step
            group_sq = torch.cat([group_sq, group_sq.new_zeros(len(self.names) - group_sq.numel())])
        return DGLStats(group_sq.sqrt(), clip.total_norm, clip.clip_coef, clip.all_finite, tuple(self.names))
