"""``mmfast.DGL``: disentangled gradient learning (ICCV 2025) in two backward passes.

    dgl = mmfast.DGL({"audio": model.audio_net, "visual": model.visual_net},
                     fusion=model.fusion_module, alpha=4.0, max_norm=40.0)
    optimizer.zero_grad()
    out, out_a, out_v = model(x_a, x_v)
    stats = dgl.backward(loss_mm, {"audio": loss_a, "visual": loss_v})
    optimizer.step()

Pass 1 backpropagates ``alpha · Σ L_m`` to every parameter except the fusion
module's; pass 2 backpropagates ``L_mm`` to every parameter except the encoders'.
The masking is done by autograd itself (``backward(inputs=...)``), so a dropped
gradient is never computed, even when the model forgot to detach. Encoder
gradients land in one flat buffer per group; the clip (``max_norm``) is one fused
norm pass over every gradient plus a rescale pass only when it bites.
"""
from __future__ import annotations

import torch

from ._clip import clip_grad_norm_
from ._dist import GradSync
from ._helper import GroupHelper
from ._stats import DGLStats


class DGL(GroupHelper):
    """Encoders learn from ``alpha ·`` their unimodal loss, the fusion module from ``L_mm``.

    Args:
        groups: ``{name: encoder module or parameters}``.
        fusion: the fusion module (or its parameters).
        alpha: factor on the unimodal losses (the reference scripts use 4 or 5).
        max_norm: clip every gradient to this total norm (the reference uses 40), or None.
        backend: passed to the fused clip (None: the best available).
        process_group, ddp: average the gradients across ranks before clipping
            (as ``mmfast.MMPareto``).

    Parameters outside the groups and the fusion module get ``dL_mm/dθ + alpha ·
    dΣL_m/dθ``, accumulated like any gradient. They are found on the first
    ``backward`` from the losses' autograd graph.
    """

    def __init__(self, groups: dict, *, fusion, alpha: float = 4.0, max_norm: float | None = 40.0, backend=None,
                 process_group=None, ddp=None):
        super().__init__(groups, n_buffers=1, extra={"fusion": fusion}, backend=backend)
        self.sync = GradSync(process_group, ddp, owner="mmfast.DGL")
        if "fusion" in groups:
            raise ValueError("groups: the name 'fusion' is taken by the fusion argument")
        self.fusion = self.extra["fusion"]
        self.alpha = float(alpha)
        self.max_norm = max_norm
        self._others = None

    def backward(self, loss_mm: torch.Tensor, losses: dict) -> DGLStats:
        unimodal = self.check_losses(loss_mm, losses)
        self.begin()
        if self._others is None:
            self._others = self.outside_leaves([loss_mm, *unimodal], exclude=self.fusion)

        for f in self.flat:
            f.attach(0, zero=True)
        uni = torch.stack([loss.reshape(()) for loss in unimodal]).sum() * self.alpha
        torch.autograd.backward(uni, inputs=self.params + self._others, retain_graph=True)
        for p in self.fusion:
            p.grad = None  # as the reference: the fusion module sees only L_mm
        torch.autograd.backward(loss_mm, inputs=self.fusion + self._others)

        if self.sync.active:
            for f in self.flat:
                self.sync.mean_(f.buffers, f"group {f.name!r}'s gradient buffer")
            rest = [p.grad for p in self.fusion + self._others if p.grad is not None]
            self.sync.mean_(rest, "the fusion and other gradients")
        grads, groups = [], []
        for g, f in enumerate(self.flat):
            grads += f.views[0]
            groups += [g] * len(f.views[0])
        rest = [p.grad for p in self.fusion + self._others if p.grad is not None]
        grads += rest
        groups += [-1] * len(rest)
        clip = clip_grad_norm_(grads, self.max_norm, groups=groups, backend=self.backend)
        self.finish()
        return DGLStats(clip.group_sq.sqrt(), clip.total_norm, clip.clip_coef, clip.all_finite, tuple(self.names))
