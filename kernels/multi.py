"""Triton kernels for K objectives: the per-tensor K x K Gram in one read of the K
gradients, and ``out = sum_k c_tk g_tk``. Same chunk-table design as combine.py:
int64 element offsets from one base tensor per operand (one dtype per call), one
program per chunk, fp64 products and partials per chunk (precision as combine.py), a
segmented fp64 reduction (no atomics).
The objectives are padded to a power of two and masked.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .combine import _ACC, BLOCK, CHUNK, _to_storage


@triton.jit
def _gram_k_kernel(base, table, partial, K: tl.constexpr, KP: tl.constexpr, ROW: tl.constexpr,
                   ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    kk = tl.arange(0, KP)
    kmask = kk < K
    offs = tl.load(table + c * ROW + kk, mask=kmask, other=0)
    n = tl.load(table + c * ROW + KP + 1)
    acc = tl.zeros([KP, KP], ACC)
    fin = tl.zeros([KP, BLOCK], ACC)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = kmask[:, None] & (i[None, :] < n)
        x = tl.load(base + offs[:, None] + i[None, :], mask=m, other=0.0).to(ACC)  # [KP, BLOCK]
        acc += tl.sum(x[:, None, :] * x[None, :, :], axis=2)
        fin += x - x  # 0 for finite inputs, NaN otherwise
    rows = tl.arange(0, KP)
    tl.store(partial + c * (KP * KP + 1) + rows[:, None] * KP + rows[None, :], acc)
    tl.store(partial + c * (KP * KP + 1) + KP * KP, tl.sum(tl.sum(fin, 1), 0))


@triton.jit
def _combine_k_kernel(base, o_base, table, coefs, partial, K: tl.constexpr, KP: tl.constexpr, ROW: tl.constexpr,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    kk = tl.arange(0, KP)
    kmask = kk < K
    offs = tl.load(table + c * ROW + kk, mask=kmask, other=0)
    o_off = tl.load(table + c * ROW + KP)
    n = tl.load(table + c * ROW + KP + 1)
    t = tl.load(table + c * ROW + KP + 2)
    coef = tl.load(coefs + t * K + kk, mask=kmask, other=0.0).to(ACC)
    sq = tl.zeros([BLOCK], ACC)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = kmask[:, None] & (i[None, :] < n)
        x = tl.load(base + offs[:, None] + i[None, :], mask=m, other=0.0).to(ACC)
        v = tl.sum(coef[:, None] * x, axis=0)
        tl.store(o_base + o_off + i, _to_storage(v, o_base.dtype.element_ty), mask=i < n)
        sq += v * v
    tl.store(partial + c, tl.sum(sq, 0))


class _KLayout:
    """Chunk table of (K offsets padded to KP, out offset, length, tensor) rows."""

    def __init__(self, out, grads):
        K, T = len(grads), len(out)
        self.K, self.KP = K, triton.next_power_of_2(K)
        self.row = self.KP + 3
        base, obase = grads[0][0], out[0]
        item = base.element_size()
        rows, lengths = [], []
        for t in range(T):
            offs = [(grads[k][t].data_ptr() - base.data_ptr()) // item for k in range(K)]
            o_off = (out[t].data_ptr() - obase.data_ptr()) // item
            before = len(rows)
            for begin in range(0, out[t].numel(), CHUNK):
                n = min(CHUNK, out[t].numel() - begin)
                rows.append([o + begin for o in offs] + [0] * (self.KP - K) + [o_off + begin, n, t])
            lengths.append(len(rows) - before)
        device = base.device
        self.n_chunks = len(rows)
        self.table = torch.tensor(rows or [[0] * self.row], dtype=torch.int64).to(device)
        self.lengths = torch.tensor(lengths, dtype=torch.long).to(device)

    def per_tensor(self, partial):
        return torch.segment_reduce(partial, "sum", lengths=self.lengths, axis=0, unsafe=True)


def _on(device: torch.device):
    """A device guard for a CUDA tensor's launches (the interpreter's CPU tensors need none)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_CACHE: "OrderedDict[tuple, _KLayout]" = OrderedDict()


def _layout(out, grads) -> _KLayout:
    dtypes = {o.dtype for o in out}
    if len(dtypes) != 1:
        raise ValueError(f"out: backend='triton' aggregates one dtype per call, got {sorted(map(str, dtypes))}")
    key = tuple(t.data_ptr() for gk in grads for t in gk) + tuple((o.data_ptr(), o.numel()) for o in out)
    key += (out[0].dtype, str(out[0].device), len(grads))
    lay = _CACHE.get(key)
    if lay is None:
        lay = _CACHE[key] = _KLayout(out, grads)
        if len(_CACHE) > 16:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return lay


def gram_k_triton(out, grads):
    """``(per-tensor Gram [T, K, K] float64, all_finite)``."""
    lay = _layout(out, grads)
    K, KP = lay.K, lay.KP
    partial = torch.zeros(max(lay.n_chunks, 1), KP * KP + 1, dtype=torch.float64, device=out[0].device)
    if lay.n_chunks:
        with _on(out[0].device):  # launch on the tensors' device, not the current one
            _gram_k_kernel[(lay.n_chunks,)](grads[0][0], lay.table, partial, K=K, KP=KP, ROW=lay.row, ACC=_ACC,
                                            BLOCK=BLOCK // KP)
    per = lay.per_tensor(partial[: lay.n_chunks])
    gram = per[:, : KP * KP].reshape(-1, KP, KP)[:, :K, :K].contiguous()
    return gram, (per[:, KP * KP] == 0).all()


def combine_k_triton(out, grads, coefs):
    """Writes ``out[t] = sum_k coefs[t, k] grads[k][t]``; returns per-tensor ``<out, out>`` [T]."""
    lay = _layout(out, grads)
    partial = torch.zeros(max(lay.n_chunks, 1), dtype=torch.float64, device=out[0].device)
    if lay.n_chunks:
        with _on(out[0].device):
            _combine_k_kernel[(lay.n_chunks,)](grads[0][0], out[0], lay.table, coefs.contiguous(), partial, K=lay.K,
                                               KP=lay.KP, ROW=lay.row, ACC=_ACC, BLOCK=BLOCK // lay.KP)
    torch.autograd.graph.increment_version(out)  # the kernel wrote through pointers
    return lay.per_tensor(partial[: lay.n_chunks, None])[:, 0]
