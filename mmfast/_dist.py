"""Gradient averaging across ranks for the training helpers (torch.distributed).

The helpers average each per-objective gradient *before* the Gram pass, so every
rank sees the global gradients, takes the same conflict decision and computes the
same update: exactly one process on the global batch. Lists are coalesced into one
flat buffer per dtype; a tensor missing on a rank (no gradient there: a branch not
taken, a missing modality) counts as zeros, and stays missing only if it is missing
on every rank, as after a plain backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class GradSync:
    def __init__(self, process_group=None, ddp=None, owner: str = "mmfast"):
        self.owner = owner
        self.ddp = None
        if ddp is not None:
            if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
                raise TypeError(f"ddp: expected a DistributedDataParallel module, got {type(ddp).__name__}")
            if process_group is not None and process_group is not ddp.process_group:
                raise ValueError("process_group: differs from ddp.process_group; pass one of them")
            process_group = ddp.process_group
            # mmfast communicates itself (after both backward passes); DDP's reducer
            # would average each pass separately and race the second pass.
            ddp.require_backward_grad_sync = False
            self.ddp = ddp
        if process_group is not None and not dist.is_initialized():
            raise RuntimeError("process_group: torch.distributed is not initialised")
        self.group = process_group
        self.world = dist.get_world_size(process_group) if process_group is not None else 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def model_params(self):
        """The parameters DDP wraps (requiring grad), or None without ``ddp=``."""
        if self.ddp is None:
            return None
        return [p for p in self.ddp.module.parameters() if p.requires_grad]

    def _all_reduce(self, t: torch.Tensor, what: str) -> None:
        try:
            dist.all_reduce(t, group=self.group)
        except Exception as e:  # a peer raised, died or timed out
            raise RuntimeError(
                f"{self.owner}: all-reduce of {what} failed; another rank probably raised or died "
                f"before reaching it ({type(e).__name__}: {e})"
            ) from e

    def mean_like(self, tensors: list, likes: list, what: str) -> list:
        """The rank-average of ``tensors``; an entry may be None (no gradient here: zeros).

        Present tensors are averaged in place and returned; a missing one comes back as
        a new tensor where some rank had it, as None where no rank had (as DDP leaves a
        globally unused parameter). ``likes[i]`` is entry i's shape, dtype and device.
        """
        if not self.active or not tensors:
            return list(tensors)
        flags = torch.tensor([t is not None for t in tensors], dtype=torch.float64, device=likes[0].device)
        by_dtype = {}
        for i, like in enumerate(likes):
            by_dtype.setdefault((like.dtype, like.device), []).append(i)
        flat = {}
        for key, idx in by_dtype.items():
            buf = torch.empty(sum(likes[i].numel() for i in idx), dtype=key[0], device=key[1])
            off = 0
            for i in idx:
                n = likes[i].numel()
                if tensors[i] is None:
                    buf[off:off + n].zero_()
                else:
                    buf[off:off + n].copy_(tensors[i].reshape(-1))
                off += n
            flat[key] = buf
        self._all_reduce(flags, f"{what} (which ranks have them)")
        for key, buf in flat.items():
            self._all_reduce(buf, what)
            buf.div_(self.world)
        out = list(tensors)
        present = flags.tolist()  # one sync per call: which tensors exist is a host decision
        for key, idx in by_dtype.items():
            buf, off = flat[key], 0
            for i in idx:
                n = likes[i].numel()
                seg = buf[off:off + n].view(likes[i].shape)
                if tensors[i] is not None:
                    tensors[i].copy_(seg)
                elif present[i] > 0:
                    out[i] = seg.clone()
                off += n
        return out

    def check_same(self, n: int, numel: int, what: str, device) -> None:
        """Raises on every rank unless all ranks pass the same ``(n, numel)``."""
        if not self.active:
            return
        sig = torch.tensor([n, numel, n * n, numel * numel], dtype=torch.float64, device=device)
        self._all_reduce(sig, f"the layout of {what}")
        s, s2 = sig[:2].tolist(), sig[2:].tolist()
        if any(abs(s2[j] * self.world - s[j] * s[j]) > 0.5 for j in range(2)):
            raise RuntimeError(
                f"{self.owner}: the ranks have different {what} this step (a branch taken on some ranks "
                f"only, or a modality missing on some): pass ddp= (the DistributedDataParallel model) so "
                f"that mmfast averages every parameter of the model"
            )
