"""The small per-tensor and per-group maths between the two passes, as device-side
torch ops (no host sync, and no host data after the first call with a layout): shared
by the foreach and Triton backends. The CPU and CUDA extensions do the same in C++
(csrc/precision.h, csrc/cpu/combine.cpp, csrc/cuda/combine.cu)."""
from __future__ import annotations

from collections import OrderedDict

import torch

from ._args import OUTSIDE
from ..pytorch.reference import mmpareto_scale

# Per-tensor combine modes, as the kernels read them: ca*a + cb*b, ca*a alone (b not
# read), cb*b alone (a not read).
MODE_AB, MODE_A, MODE_B = 0, 1, 2


class GroupLayout:
    """What the group ids fix, built once per (groups, fusion, device) and kept on the device.

    * ``group_sums``: ``[G, k]`` sums of ``[T, k]`` rows by group: a stable sort by group
      then a segmented sum, so no atomics (the same bits on every run) and, unlike a
      one-hot matmul, a NaN stays in its own group. Empty groups sum to 0.
    * ``index`` (group of each tensor, OUTSIDE as 0), ``inside``, ``empty`` (group ids no
      tensor uses), and the DGL/sum roles: ``mode`` and the 0/1 factors of ``a`` and ``b``.
    """

    def __init__(self, groups: tuple, num_groups: int, fusion: tuple, device: torch.device):
        order = sorted((g, t) for t, g in enumerate(groups) if g != OUTSIDE)
        counts = [0] * num_groups
        for g, _ in order:
            counts[g] += 1
        dev = dict(device=device)
        self.num_groups = num_groups
        self.perm = torch.tensor([t for _, t in order], dtype=torch.long).to(**dev)
        self.lengths = torch.tensor(counts, dtype=torch.long).to(**dev)
        self.empty = self.lengths == 0
        self.index = torch.tensor([max(g, 0) for g in groups], dtype=torch.long).to(**dev)
        self.inside = torch.tensor([g != OUTSIDE for g in groups], dtype=torch.bool).to(**dev)
        fusion = fusion or (False,) * len(groups)
        self.fusion = torch.tensor(fusion, dtype=torch.bool).to(**dev)
        # DGL: fusion tensors take a alone, encoders b alone, the rest a + alpha b.
        self.dgl_mode = torch.tensor([MODE_A if f else (MODE_B if g != OUTSIDE else MODE_AB)
                                      for g, f in zip(groups, fusion)], dtype=torch.int32).to(**dev)
        self.dgl_ca = (self.fusion | ~self.inside).double()
        self.dgl_cb = (~self.fusion).double()  # times alpha
        self.ones = torch.ones(len(groups), dtype=torch.float64, **dev)
        self.mode_ab = torch.full((len(groups),), MODE_AB, dtype=torch.int32, **dev)

    def group_sums(self, per_tensor: torch.Tensor) -> torch.Tensor:
        if self.num_groups == 0:
            return per_tensor.new_zeros(0, per_tensor.shape[1])
        rows = per_tensor.index_select(0, self.perm)
        return torch.segment_reduce(rows, "sum", lengths=self.lengths, axis=0, unsafe=True)

    def group_of(self, per_group: torch.Tensor) -> torch.Tensor:
        """``per_group[G]`` read per tensor (``[T]``; 0 for tensors outside every group)."""
        if self.num_groups == 0:
            return torch.zeros_like(self.ones)
        return per_group.index_select(0, self.index)

    def roles(self, method: str, alpha: float) -> tuple:
        """``(ca, cb, mode)`` device tensors for ``"dgl"`` and ``"sum"``: fixed by the roles."""
        if method == "sum":
            return self.ones, self.ones, self.mode_ab
        return self.dgl_ca, self.dgl_cb * alpha, self.dgl_mode


_LAYOUTS: "OrderedDict[tuple, GroupLayout]" = OrderedDict()


def group_layout(groups: list, num_groups: int, fusion, device: torch.device) -> GroupLayout:
    """The cached ``GroupLayout`` (a few small tensors per entry; the 64 latest are kept)."""
    key = (tuple(groups), num_groups, tuple(fusion) if fusion else None, device)
    lay = _LAYOUTS.get(key)
    if lay is None:
        lay = _LAYOUTS[key] = GroupLayout(key[0], num_groups, key[2], device)
        if len(_LAYOUTS) > 64:
            _LAYOUTS.popitem(last=False)
    return lay


def mmpareto_coefficients(per_tensor: torch.Tensor, w_mm: torch.Tensor, lay: GroupLayout, gamma: float):
    """``(ca, cb)`` per tensor so that ``out_t = ca_t a_t + cb_t b_t`` (docs/semantics.md, steps 3-5)."""
    aa, ab, bb = per_tensor.unbind(1)
    w = lay.group_of(w_mm)
    v = 1 - w
    s = mmpareto_scale(aa, ab, bb, w, v, gamma)
    return torch.where(lay.inside, 2 * s * w, 1.0), torch.where(lay.inside, 2 * s * v, 1.0)
