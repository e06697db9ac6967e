"""The statistics every combine returns: device tensors, never synced here."""
from __future__ import annotations

from typing import NamedTuple

import torch


class CombineStats(NamedTuple):
    """Per-group and global statistics of one combine (docs/semantics.md, "Statistics").

    Every field is a tensor on the gradients' device (float64 unless noted), so
    building it never synchronises the host. ``as_dict()`` is the one place that
    does, for logging.

    * ``gram``: ``[G, 3]``, per group ``(AA, AB, BB)``.
    * ``cos``: ``[G]``, cosine between the group's multimodal and unimodal
      gradients (0 where either is all zeros).
    * ``w_mm``, ``w_uni``: ``[G]``, the coefficients applied to the group's
      encoder tensors: the MMPareto weights, ``(0, alpha)`` for DGL, ``(1, 1)``
      for ``"sum"``.
    * ``conflict``: ``[G]`` bool, ``AB <= 0`` (the MMPareto conflict test).
    * ``total_norm``: ``[]``, L2 norm of every combined gradient, before clipping.
    * ``clip_coef``: ``[]``, the factor clipping applied (1 without ``max_norm``).
    * ``all_finite``: ``[]`` bool, whether every input gradient was finite.
    """

    gram: torch.Tensor
    cos: torch.Tensor
    w_mm: torch.Tensor
    w_uni: torch.Tensor
    conflict: torch.Tensor
    total_norm: torch.Tensor
    clip_coef: torch.Tensor
    all_finite: torch.Tensor
    names: tuple = ()  # group names, when a training helper made the stats

    def as_dict(self) -> dict:
        """Python numbers for logging (per-group values keyed by name when known). Syncs."""
        g = self.gram.detach().cpu().tolist()
        per_group = {
            "AA": [r[0] for r in g],
            "AB": [r[1] for r in g],
            "BB": [r[2] for r in g],
            "cos": self.cos.detach().cpu().tolist(),
            "w_mm": self.w_mm.detach().cpu().tolist(),
            "w_uni": self.w_uni.detach().cpu().tolist(),
            "conflict": self.conflict.detach().cpu().tolist(),
        }
        return {**name_groups(per_group, self.names), **scalars(self)}


def name_groups(per_group: dict, names: tuple) -> dict:
    if not names:
        return per_group
    return {key: dict(zip(names, values)) for key, values in per_group.items()}


def scalars(stats) -> dict:
    return {
        "total_norm": float(stats.total_norm),
        "clip_coef": float(stats.clip_coef),
        "all_finite": bool(stats.all_finite),
    }


class DGLStats(NamedTuple):
    """What ``mmfast.DGL.backward`` returns: device tensors, ``as_dict()`` syncs.

    * ``group_norm``: ``[G]``, norm of each encoder's update (``alpha·b``) before clipping.
    * ``total_norm``, ``clip_coef``, ``all_finite``: as ``CombineStats``.
    """

    group_norm: torch.Tensor
    total_norm: torch.Tensor
    clip_coef: torch.Tensor
    all_finite: torch.Tensor
    names: tuple = ()

    def as_dict(self) -> dict:
        per_group = {"group_norm": self.group_norm.detach().cpu().tolist()}
        return {**name_groups(per_group, self.names), **scalars(self)}
