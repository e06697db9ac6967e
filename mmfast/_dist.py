"""Gradient averaging across ranks for the training helpers (torch.distributed).

The helpers average each per-objective gradient *before* the Gram pass, so every
rank sees the global gradients, takes the same conflict decision and computes the
same update: exactly one process on the global batch. One all-reduce per flat
buffer, one coalesced all-reduce (per dtype) for the remaining gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class GradSync:
    def __init__(self, process_group=None, ddp=None, owner: str = "mmfast"):
        self.owner = owner
        if ddp is not None:
            if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
                raise TypeError(f"ddp: expected a DistributedDataParallel module, got {type(ddp).__name__}")
            if process_group is not None and process_group is not ddp.process_group:
                raise ValueError("process_group: differs from ddp.process_group; pass one of them")
            process_group = ddp.process_group
            # mmfast communicates itself (after both backward passes); DDP's reducer
            # would average each pass separately and race the second pass.
            ddp.require_backward_grad_sync = False
        self.group = process_group
        self.world = dist.get_world_size(process_group) if process_group is not None else 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def mean_(self, tensors: list, what: str) -> None:
        """Averages ``tensors`` in place across ranks (coalesced per dtype)."""
        if not self.active or not tensors:
            return
        by_dtype = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = ts[0] if len(ts) == 1 else _flatten_dense_tensors(ts)
            try:
                dist.all_reduce(flat, group=self.group)
            except Exception as e:  # a peer raised, died or timed out
                raise RuntimeError(
                    f"{self.owner}: all-reduce of {what} failed; another rank probably raised or died "
                    f"before reaching it ({type(e).__name__}: {e})"
                ) from e
            flat.div_(self.world)
            if len(ts) > 1:
                for t, r in zip(ts, _unflatten_dense_tensors(flat, ts)):
                    t.copy_(r)
