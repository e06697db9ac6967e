"""Gradient averaging across ranks for the training helpers (torch.distributed).

The helpers average each per-objective gradient *before* the Gram pass, so every
rank sees the global gradients, takes the same conflict decision and computes the
same update: exactly one process on the global batch. A tensor missing on a rank (no
gradient there: a branch not taken, a missing modality) counts as zeros, and stays
missing only if it is missing on every rank, as after a plain backward.

``Averaging`` does it as DDP's reducer does: fixed buckets (about 25 MB, one dtype
each) in a fixed order, each all-reduced asynchronously as soon as all its gradients
are ready, so the communication of one backward pass overlaps the rest of that pass
and the next one; the helper waits only before the Gram pass. The order of the
collectives is the same on every rank whatever order the gradients arrive in (a
bucket is launched only after the ones before it), so ranks whose graphs differ (a
missing modality) still match.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


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

    def check_same(self, numels: list, what: str, device) -> None:
        """Raises on every rank unless all ranks pass the same list of sizes (compared by
        count, total and an order-sensitive sum: a MAX all-reduce of each value and of its
        negation)."""
        if not self.active:
            return
        sig = [len(numels), sum(numels), sum((i + 1) * n for i, n in enumerate(numels))]
        t = torch.tensor(sig + [-x for x in sig], dtype=torch.int64, device=device)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        except Exception as e:
            raise RuntimeError(f"{self.owner}: all-reduce of the layout of {what} failed; another rank probably "
                               f"raised or died before reaching it ({type(e).__name__}: {e})") from e
        hi, lo = t[:3].tolist(), [-x for x in t[3:].tolist()]
        if hi != lo:
            raise RuntimeError(
                f"{self.owner}: the ranks have different {what} this step (a branch taken on some ranks "
                f"only, or a modality missing on some): pass ddp= (the DistributedDataParallel model) so "
                f"that mmfast averages every parameter of the model"
            )


class Averaging:
    """The all-reduces of one ``backward``: ``streams[s]`` is a list of tensors' likes
    (shape, dtype, device); ``ready(s, i, value)`` hands entry i of stream s over (None:
    no gradient here). Buckets are launched in stream order, then bucket order."""

    def __init__(self, sync: GradSync, streams: list, whats: list):
        self.sync, self.whats = sync, whats
        self.streams = streams
        self.values = [[None] * len(likes) for likes in streams]
        self.done = [[False] * len(likes) for likes in streams]
        self.buckets, self.where = [], {}
        for s, likes in enumerate(streams):
            cur, size, key = [], 0, None
            for i in reversed(range(len(likes))):  # autograd reaches the last layers first
                like = likes[i]
                k = (like.dtype, like.device)
                nbytes = like.numel() * like.element_size()
                if cur and (k != key or size + nbytes > BUCKET_BYTES):
                    self.buckets.append((s, cur))
                    cur, size = [], 0
                cur.append(i)
                size += nbytes
                key = k
            if cur:
                self.buckets.append((s, cur))
        for b, (s, idx) in enumerate(self.buckets):
            for i in idx:
                self.where[(s, i)] = b
        self.pending = [len(idx) for _, idx in self.buckets]
        self.next = 0
        self.works = []

    def ready(self, s: int, i: int, value) -> None:
        if self.done[s][i]:
            return
        self.done[s][i] = True
        self.values[s][i] = value
        self.pending[self.where[(s, i)]] -= 1
        while self.next < len(self.buckets) and self.pending[self.next] == 0:
            self._launch(self.next)
            self.next += 1

    def ready_all(self, s: int, values: list) -> None:
        """Hands over every entry of stream s not handed over yet."""
        for i, v in enumerate(values):
            self.ready(s, i, v)

    def _launch(self, b: int) -> None:
        s, idx = self.buckets[b]
        likes = self.streams[s]
        like = likes[idx[0]]
        flat = torch.empty(sum(likes[i].numel() for i in idx), dtype=like.dtype, device=like.device)
        off = 0
        for i in idx:
            n = likes[i].numel()
            v = self.values[s][i]
            if v is None:
                flat[off:off + n].zero_()
            else:
                flat[off:off + n].copy_(v.reshape(-1))
            off += n
        flags = torch.tensor([self.values[s][i] is not None for i in idx], dtype=torch.float32, device=like.device)
        works = []
        for t in (flat, flags):
            try:
                works.append(dist.all_reduce(t, group=self.sync.group, async_op=True))
            except Exception as e:
                raise self._error(s, e) from e
        self.works.append((b, flat, flags, works))

    def _error(self, s, e) -> RuntimeError:
        return RuntimeError(
            f"{self.sync.owner}: all-reduce of {self.whats[s]} failed; another rank probably raised or died "
            f"before reaching it ({type(e).__name__}: {e})")

    def wait(self) -> list:
        """Every stream's averaged values (after all entries were handed over): present
        tensors averaged in place, a missing one a new tensor where some rank had it,
        None where none had."""
        assert self.next == len(self.buckets), "a gradient was never handed over"
        for b, flat, flags, works in self.works:
            s, idx = self.buckets[b]
            for w in works:
                try:
                    w.wait()
                except Exception as e:
                    raise self._error(s, e) from e
            flat.div_(self.sync.world)
            present = flags.tolist()  # which tensors exist is a host decision, as in DDP
            off = 0
            for j, i in enumerate(idx):
                like = self.streams[s][i]
                seg = flat[off:off + like.numel()].view(like.shape)
                off += like.numel()
                if self.values[s][i] is not None:
                    self.values[s][i].copy_(seg)
                elif present[j] > 0:
                    self.values[s][i] = seg.clone()
        self.works = []
        return self.values
