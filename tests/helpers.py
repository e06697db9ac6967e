"""Input builders and comparisons shared by the tests."""
from __future__ import annotations

import torch

import mmfast

# Largest acceptable error relative to max|reference| per dtype, and per element.
TOL = {
    torch.float64: (1e-12, 0.0),
    torch.float32: (1e-5, 0.0),
    torch.bfloat16: (2e-3, 2**-7),
    torch.float16: (2e-4, 2**-10),
}


def make_grads(shapes, dtype=torch.float32, seed=0, mix=-0.3, scale=1.0):
    """Fresh random (a, b) lists; ``b = noise + mix * a``, so mix < 0 leans to conflict."""
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes]
    b = [torch.randn(s, generator=gen, dtype=torch.float64) * scale * 0.7 + mix * x for s, x in zip(shapes, a)]
    return [x.to(dtype) for x in a], [x.to(dtype) for x in b]


def poisoned_like(ts):
    return [torch.full_like(t, float("nan")) for t in ts]


def reference64(a, b, **kw):
    """The reference on the fp64 upcast of the inputs: the oracle for every dtype."""
    a64 = [x.double() for x in a]
    b64 = [x.double() for x in b]
    out = [torch.empty_like(x) for x in a64]
    stats = mmfast.combine_(out, a64, b64, backend="torch", **kw)
    return out, stats


def assert_close_to_reference(out, ref, dtype):
    rtol_max, rtol_elem = TOL[dtype]
    scale = max((r.abs().max().item() for r in ref if r.numel()), default=0.0)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == dtype, f"out[{i}] dtype changed to {o.dtype}"
        if not o.numel():
            continue
        assert not torch.isnan(o).any(), f"out[{i}] has NaN: not fully written"
        err = (o.double() - r).abs()
        bound = rtol_max * scale + rtol_elem * r.abs() + 1e-300
        worst = (err - bound).max().item()
        assert worst <= 0, f"out[{i}] shape {tuple(o.shape)}: max err {err.max().item():.3e}, scale {scale:.3e}"


def assert_stats_close(stats, ref, rtol=1e-6, dtype=torch.float32):
    # The output norm may be taken before or after rounding to a half dtype.
    out_rtol = max(rtol, TOL[dtype][1] * 2)
    for name in ("gram", "cos", "w_mm", "w_uni", "total_norm", "clip_coef"):
        got, want = getattr(stats, name).double(), getattr(ref, name).double()
        assert got.shape == want.shape, name
        if not got.numel():
            continue
        tol = (out_rtol if name in ("total_norm", "clip_coef") else rtol) * max(want.abs().max().item(), 1e-30)
        assert (got - want).abs().max().item() <= tol, (name, got, want)
    assert torch.equal(stats.conflict, ref.conflict)
    assert bool(stats.all_finite) == bool(ref.all_finite)
