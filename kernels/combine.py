"""Triton kernels of mmfast: the Gram pass, the combine pass and the clip rescale.

One launch per pass covers every tensor of every group. A chunk table built on the
host from the tensors' addresses (cached per layout, moved to the device once)
gives each program its chunk: int64 element offsets from a base tensor per
operand, and the chunk's length. Partial sums are written per chunk and reduced on
the device in a fixed order: no atomics, the same bits on every run.

Precision (docs/semantics.md): products and sums in fp64 (fp32 products are exact in fp64),
``ca a + cb b`` formed in fp64 with fp64 coefficients. On a GPU this is plain fp64, not
a compensated fp32 sum: the passes are memory-bound (three fp64 FMAs per 8 bytes read),
which data-centre GPUs (fp64 at half the fp32 rate) absorb; a consumer GPU (1/64 rate)
would be compute-bound here, which is the price of exactness. The weights and scales are device-side
torch ops (mmfast/ops/_device_math.py) read by the combine kernel through pointers, so
nothing here synchronises the host and the whole combine can be captured in a CUDA
graph.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from mmfast.ops import CombineArgs, CombineStats, group_layout, mmpareto_coefficients
from mmfast.pytorch.reference import CHUNK, clip_coefficient, group_stats

BLOCK = 1024  # lanes per program: 32 products per lane per chunk, then a tree (ZERO_TOL's depth)
_ACC = tl.float64


@triton.jit
def _to_storage(v, ty: tl.constexpr):
    """``v`` rounded to the storage type ``ty`` through fp32 (as the other backends): to
    nearest even. bfloat16 by integer rounding (the interpreter's own cast truncates)."""
    if ty == tl.float64:
        return v.to(tl.float64)
    f = v.to(tl.float32)
    if ty == tl.bfloat16:
        u = f.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(f != f, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return f.to(ty)


@triton.jit
def _gram_kernel(a_base, b_base, table, partial, ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    a_off = tl.load(table + c * 5 + 0)
    b_off = tl.load(table + c * 5 + 1)
    n = tl.load(table + c * 5 + 3)
    s_aa = tl.zeros([BLOCK], ACC)
    s_ab = tl.zeros([BLOCK], ACC)
    s_bb = tl.zeros([BLOCK], ACC)
    fin = tl.zeros([BLOCK], ACC)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < n
        x = tl.load(a_base + a_off + i, mask=m, other=0.0).to(ACC)  # cast at once (interpreter)
        y = tl.load(b_base + b_off + i, mask=m, other=0.0).to(ACC)
        s_aa += x * x
        s_ab += x * y
        s_bb += y * y
        fin += (x - x) + (y - y)  # 0 for finite inputs, NaN otherwise
    tl.store(partial + c * 5 + 0, tl.sum(s_aa, 0))
    tl.store(partial + c * 5 + 1, tl.sum(s_ab, 0))
    tl.store(partial + c * 5 + 2, tl.sum(s_bb, 0))
    tl.store(partial + c * 5 + 3, tl.sum(fin, 0))


@triton.jit
def _combine_kernel(a_base, b_base, o_base, table, ca_ptr, cb_ptr, mode_ptr, partial,
                    WITH_GRAM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    a_off = tl.load(table + c * 5 + 0)
    b_off = tl.load(table + c * 5 + 1)
    o_off = tl.load(table + c * 5 + 2)
    n = tl.load(table + c * 5 + 3)
    t = tl.load(table + c * 5 + 4)
    ca = tl.load(ca_ptr + t).to(ACC)
    cb = tl.load(cb_ptr + t).to(ACC)
    mode = tl.load(mode_ptr + t)
    use_a = mode != 2
    use_b = mode != 1
    s_sq = tl.zeros([BLOCK], ACC)
    s_aa = tl.zeros([BLOCK], ACC)
    s_ab = tl.zeros([BLOCK], ACC)
    s_bb = tl.zeros([BLOCK], ACC)
    fin = tl.zeros([BLOCK], ACC)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < n
        # A dropped input is not read (DGL): its NaN cannot reach out.
        x = tl.load(a_base + a_off + i, mask=m & (use_a | WITH_GRAM), other=0.0).to(ACC)
        y = tl.load(b_base + b_off + i, mask=m & (use_b | WITH_GRAM), other=0.0).to(ACC)
        v = tl.where(use_a, ca * x, 0.0) + tl.where(use_b, cb * y, 0.0)
        # Rounded through fp32, as the other backends (and torch's own fp64 -> half casts).
        tl.store(o_base + o_off + i, _to_storage(v, o_base.dtype.element_ty), mask=m)
        s_sq += v * v
        if WITH_GRAM:
            s_aa += x * x
            s_ab += x * y
            s_bb += y * y
        fin += tl.where(use_a | WITH_GRAM, x - x, 0.0) + tl.where(use_b | WITH_GRAM, y - y, 0.0)
    tl.store(partial + c * 5 + 0, tl.sum(s_aa, 0))
    tl.store(partial + c * 5 + 1, tl.sum(s_ab, 0))
    tl.store(partial + c * 5 + 2, tl.sum(s_bb, 0))
    tl.store(partial + c * 5 + 3, tl.sum(fin, 0))
    tl.store(partial + c * 5 + 4, tl.sum(s_sq, 0))


@triton.jit
def _scale_kernel(o_base, table, coef_ptr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    o_off = tl.load(table + c * 5 + 2)
    n = tl.load(table + c * 5 + 3)
    coef = tl.load(coef_ptr).to(ACC)  # the coefficient rounded to the maths type, as torch's clip
    # No traffic when the clip does not bite (a NaN coefficient bites, as in torch).
    n = tl.where((coef < 1.0) | (coef != coef), n, 0)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < n
        v = tl.load(o_base + o_off + i, mask=m, other=0.0).to(ACC)
        tl.store(o_base + o_off + i, _to_storage(v * coef, o_base.dtype.element_ty), mask=m)


class _Layout:
    """The chunk table of one set of tensors, on their device, and its reductions.

    Holds no reference to the tensors (a cache entry must not keep gradients alive):
    offsets are relative to the addresses of the first tensor of each list, which the
    cache key fixes, and each call passes its own tensors as the bases (``bases``)."""

    def __init__(self, a, b, out, ids):
        bases = (a[0], b[0], out[0])
        item = a[0].element_size()
        rows, bounds = [], [0]
        for t, x, y, o in zip(ids, a, b, out):
            offs = [(z.data_ptr() - base.data_ptr()) // item for z, base in zip((x, y, o), bases)]
            for begin in range(0, x.numel(), CHUNK):
                n = min(CHUNK, x.numel() - begin)
                rows.append([offs[0] + begin, offs[1] + begin, offs[2] + begin, n, t])
            bounds.append(len(rows))
        device = a[0].device
        self.first = ids[0]
        # Scale pass maths: the stored type, at least fp32 (as torch's clip_grad_norm_).
        self.acc = tl.float64 if a[0].dtype == torch.float64 else tl.float32
        self.ids = torch.tensor(ids, dtype=torch.long).to(device)
        self.all = ids == list(range(len(ids)))  # every tensor, in order: no scatter
        self.n_chunks = len(rows)
        self.table = torch.tensor(rows or [[0, 0, 0, 0, 0]], dtype=torch.int64).to(device)
        self.lengths = torch.tensor([e - s for s, e in zip(bounds, bounds[1:])], dtype=torch.long).to(device)

    def bases(self, a, b, out) -> tuple:
        return a[self.first], b[self.first], out[self.first]

    def per_tensor(self, partial: torch.Tensor) -> torch.Tensor:
        """``[T, k]`` fp64 sums of the per-chunk ``partial[C, k]`` (chunks are in tensor order).

        A segmented sum: fixed order, no atomics, and unlike differences of a running
        sum it keeps a small tensor's digits next to large ones.
        """
        return torch.segment_reduce(partial, "sum", lengths=self.lengths, axis=0, unsafe=True)


_CACHE: "OrderedDict[tuple, _Layout]" = OrderedDict()


def _layouts(a, b, out) -> list:
    """One layout per dtype (a launch addresses memory through one element type)."""
    key = tuple((x.data_ptr(), y.data_ptr(), o.data_ptr(), x.numel(), x.dtype) for x, y, o in zip(a, b, out))
    key += (str(a[0].device),)
    lays = _CACHE.get(key)
    if lays is None:
        by_dtype = {}
        for t, x in enumerate(a):
            by_dtype.setdefault(x.dtype, []).append(t)
        lays = [_Layout([a[t] for t in ids], [b[t] for t in ids], [out[t] for t in ids], ids)
                for ids in by_dtype.values()]
        _CACHE[key] = lays
        if len(_CACHE) > 16:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return lays


def _per_tensor(lays, partials, n_tensors) -> torch.Tensor:
    """``[T, 5]`` fp64 per-tensor sums gathered from every layout's chunk partials."""
    if len(lays) == 1 and lays[0].all:  # one dtype: no gather
        return lays[0].per_tensor(partials[0][: lays[0].n_chunks])
    full = torch.zeros(n_tensors, 5, dtype=torch.float64, device=partials[0].device)
    for lay, part in zip(lays, partials):
        full.index_copy_(0, lay.ids, lay.per_tensor(part[: lay.n_chunks]))
    return full


def _partials(lays) -> list:
    # Every chunk's program writes its row: no fill.
    return [torch.empty(max(lay.n_chunks, 1), 5, device=lay.table.device, dtype=torch.float64) for lay in lays]


def combine_triton(args: CombineArgs) -> CombineStats:
    device = args.out[0].device
    if device.type != "cuda":  # the interpreter (TRITON_INTERPRET=1) on CPU tensors
        return _combine_triton(args)
    with torch.cuda.device(device):  # Triton launches on the current device: make it the tensors'
        return _combine_triton(args)


def _combine_triton(args: CombineArgs) -> CombineStats:
    a, b, out = args.grads_mm, args.grads_uni, args.out
    lays = _layouts(a, b, out)
    glay = group_layout(args.groups, args.num_groups, args.fusion if args.method == "dgl" else None, a[0].device)
    n = len(out)
    partials = _partials(lays)
    if args.method == "mmpareto":
        for lay, part in zip(lays, partials):
            if lay.n_chunks:
                _gram_kernel[(lay.n_chunks,)](*lay.bases(a, b, out)[:2], lay.table, part, ACC=_ACC, BLOCK=BLOCK)
        per_tensor = _per_tensor(lays, partials, n)
        gram = glay.group_sums(per_tensor[:, :3])
        stats = group_stats(args.method, gram, args.alpha, None, None, None, glay.empty)
        ca, cb = mmpareto_coefficients(per_tensor[:, :3], stats.w_mm, glay, args.gamma)
        mode = glay.mode_ab
        fin = per_tensor[:, 3]
    else:
        ca, cb, mode = glay.roles(args.method, args.alpha)
    with_gram = args.method != "mmpareto"  # one pass: the Gram rides along for the statistics
    partials = _partials(lays)
    for lay, part in zip(lays, partials):
        if lay.n_chunks:
            _combine_kernel[(lay.n_chunks,)](*lay.bases(a, b, out), lay.table, ca, cb, mode, part,
                                             WITH_GRAM=with_gram, ACC=_ACC, BLOCK=BLOCK)
    per_tensor_2 = _per_tensor(lays, partials, n)
    if with_gram:
        gram = glay.group_sums(per_tensor_2[:, :3])
        stats = group_stats(args.method, gram, args.alpha, None, None, None, glay.empty)
        fin = per_tensor_2[:, 3]
    total_norm = per_tensor_2[:, 4].sum().sqrt()
    clip_coef = clip_coefficient(total_norm, args.max_norm)
    if args.max_norm is not None:
        for lay in lays:
            if lay.n_chunks:
                _scale_kernel[(lay.n_chunks,)](lay.bases(a, b, out)[2], lay.table, clip_coef, ACC=lay.acc, BLOCK=BLOCK)
    torch.autograd.graph.increment_version(out)  # the kernels wrote through pointers
    return stats._replace(total_norm=total_norm, clip_coef=clip_coef, all_finite=(fin == 0).all())
