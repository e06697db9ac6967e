"""Precision and non-finite properties (issue 13), every backend against an fp64
evaluation of docs/semantics.md's formulas written here from the definition (not the library's
reference): strong conflict, mixed magnitudes, extreme scales, half inputs, NaN/Inf.

Bars (docs/semantics.md, Precision): per-tensor norm within 1e-5 relative and every element
within 3e-4 of the tensor's largest, for fp32 inputs, at 1 thread and the default
thread count. Why they hold: the Gram is accumulated in fp64 from exact fp32 products
(error <= 2^-36 of the terms, mmfast/pytorch/reference.py), so ||n_t||^2, which under
b = -3a + noise is about noise^2/36 of its terms, keeps 1e-11/1e-8 = 1e-3 relative accuracy
even at noise 1e-4 in the worst case (typically 1e-8); the output is n_t formed in fp64 and
rounded once to fp32 (2^-24 per element).
"""
from __future__ import annotations

import math

import pytest
import torch

import mmfast
from mmfast.pytorch.reference import ZERO_TOL

BACKENDS = [name for name in ("torch", "foreach", "cpu", "triton") if mmfast.backends()[name].available]
# A conv weight, an odd-length vector, a linear weight (several chunks of 2^15).
SHAPES = [(64, 32, 3, 3), (1001,), (256, 513)]


def oracle(a, b, groups, gamma=1.5):
    """MMPareto from the definition on the fp64 upcast: n_t as a vector, ||n_t|| its norm."""
    a = [x.double() for x in a]
    b = [y.double() for y in b]
    out = [None] * len(a)
    for g in sorted(set(groups) - {-1}):
        idx = [t for t, gt in enumerate(groups) if gt == g]
        AA = sum(torch.dot(a[t].flatten(), a[t].flatten()) for t in idx).item()
        AB = sum(torch.dot(a[t].flatten(), b[t].flatten()) for t in idx).item()
        BB = sum(torch.dot(b[t].flatten(), b[t].flatten()) for t in idx).item()
        if AB > 0:
            w = 0.5
        elif AB >= AA:
            w = 0.999
        elif AB >= BB:
            w = 0.001
        else:
            w = (BB - AB) / (AA + BB - 2 * AB)
        u = 1 - w
        for t in idx:
            n = 2 * w * a[t] + 2 * u * b[t]
            nn = n.square().sum().item()
            terms = 4 * (w * a[t].norm().item() + u * b[t].norm().item()) ** 2
            if nn <= ZERO_TOL * terms:
                out[t] = torch.zeros_like(n)
            else:
                out[t] = gamma * n * max(math.sqrt((a[t] + b[t]).square().sum().item() / nn), 1.0)
    for t, g in enumerate(groups):
        if g == -1:
            out[t] = a[t] + b[t]
    return out


def conflict_grads(shapes, noise, dtype=torch.float32, seed=0, scales=None):
    """``b = -3a + noise`` (noise relative to b's signal), optionally scaled per tensor."""
    gen = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * len(shapes)
    a, b = [], []
    for s, c in zip(shapes, scales):
        x = torch.randn(s, generator=gen, dtype=torch.float64)
        e = torch.randn(s, generator=gen, dtype=torch.float64)
        a.append((c * x).to(dtype))
        b.append((c * (-3 * x + 3 * noise * e)).to(dtype))
    return a, b


def check(out, ref, dtype=torch.float32, where=""):
    """Per tensor: norm within 1e-5 relative, elements within 3e-4 of the largest (fp32).
    Half outputs: one rounding of the exact value (2^-8 bf16, 2^-11 fp16) on top."""
    ulp = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    for t, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == dtype
        o = o.double()
        rn, on = r.norm().item(), o.norm().item()
        assert abs(on - rn) <= (1e-5 + ulp) * rn + 1e-300, f"{where} tensor {t}: norm {on:.9e} vs {rn:.9e}"
        big = r.abs().max().item()
        err = ((o - r).abs() - ulp * r.abs()).max().item()
        assert err <= 3e-4 * big + 1e-300, f"{where} tensor {t}: element error {err:.3e} vs largest {big:.3e}"


@pytest.fixture(params=["1 thread", "default threads"])
def threads(request):
    old = torch.get_num_threads()
    if request.param == "1 thread":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", [1e-1, 1e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("groups", [[0, 0, 0], [0, 1, 2]], ids=["one group", "a group each"])
def test_strong_conflict(backend, noise, groups, threads):
    a, b = conflict_grads(SHAPES, noise, seed=int(noise * 1e5))
    out = [torch.full_like(x, float("nan")) for x in a]
    stats = mmfast.combine_(out, a, b, groups=groups, backend=backend)
    assert stats.conflict.all() and stats.all_finite.item()
    check(out, oracle(a, b, groups), where=f"{backend} noise {noise}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", [1e-1, 1e-3])
def test_mixed_magnitudes(backend, noise):
    # One group whose tensors differ by 8 orders of magnitude: the small ones' per-tensor
    # terms must not drown in the large ones' rounding (per-tensor sums, never differences).
    shapes = SHAPES + [(7,), (33, 5)]
    scales = [1e4, 1e-4, 1.0, 1e2, 1e-2]
    a, b = conflict_grads(shapes, noise, seed=3, scales=scales)
    for groups in ([0] * 5, [0, 0, 1, 1, -1]):
        out = [torch.full_like(x, float("nan")) for x in a]
        mmfast.combine_(out, a, b, groups=groups, backend=backend)
        check(out, oracle(a, b, groups), where=f"{backend} {groups}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e20, 1e-20])
@pytest.mark.parametrize("noise", [1.0, 1e-3])
def test_extreme_scale(backend, scale, noise):
    # fp32 squares of 1e20 overflow fp32 (3.4e38) and those of 1e-20 underflow it; fp64 holds both.
    if noise == 1.0:  # no conflict: b = 0.5 a + noise
        gen = torch.Generator().manual_seed(5)
        x = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        a = [(scale * t).float() for t in x]
        b = [(scale * (0.5 * t + 0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float64))).float() for t in x]
    else:
        a, b = conflict_grads(SHAPES, noise, seed=6, scales=[scale] * 3)
    groups = [0, 0, 1]
    out = [torch.full_like(t, float("nan")) for t in a]
    stats = mmfast.combine_(out, a, b, groups=groups, backend=backend)
    assert stats.all_finite.item()
    assert torch.isfinite(stats.gram).all() and torch.isfinite(stats.total_norm)
    check(out, oracle(a, b, groups), where=f"{backend} scale {scale}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("noise", [1e-1, 1e-2])
def test_half_inputs(backend, dtype, noise):
    # The inputs' own rounding is part of the input; the maths on them is exact to fp64
    # and the output is rounded once to the half dtype.
    a, b = conflict_grads(SHAPES, noise, dtype=dtype, seed=7)
    out = [torch.full_like(x, float("nan")) for x in a]
    mmfast.combine_(out, a, b, groups=[0, 0, 1], backend=backend)
    check(out, oracle(a, b, [0, 0, 1]), dtype=dtype, where=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_antiparallel_is_zero_everywhere(backend):
    # n_t = 0 in exact arithmetic (one tensor per group, b exactly -k a): g_t = 0 on every
    # backend, not rounding noise scaled up; a tiny but real n_t is kept.
    a = [torch.tensor([2.0]), torch.randn(1000, generator=torch.Generator().manual_seed(8)), torch.tensor([1.0, 2.0])]
    b = [torch.tensor([-3.0]), -0.5 * a[1], torch.tensor([-1.0, -2.0 + 2.0**-12])]  # ||n||^2 / T = 3e-9 > 2^-36
    out = [torch.full_like(x, float("nan")) for x in a]
    mmfast.combine_(out, a, b, groups=[0, 1, 2], backend=backend)
    assert torch.equal(out[0], torch.zeros(1)) and torch.equal(out[1], torch.zeros(1000))
    check(out[2:], oracle(a[2:], b[2:], [0]), where=backend)
    assert out[2].abs().max() > 0


# --- non-finite inputs: one policy, identical on every backend -------------------------

def _nonfinite_case(kind, bad, dtype=torch.float32):
    gen = torch.Generator().manual_seed(11)
    shapes = [(50,), (33,), (40,), (20,)]
    a = [torch.randn(s, generator=gen) for s in shapes]
    b = [torch.randn(s, generator=gen) - 0.5 * x for s, x in zip(shapes, a)]
    a, b = [x.to(dtype) for x in a], [x.to(dtype) for x in b]
    where = {"a_in_group": (a, 0), "b_in_group": (b, 1), "a_outside": (a, 3), "b_fusion": (b, 2)}[kind]
    where[0][where[1]][7] = bad
    return a, b


@pytest.mark.parametrize("kind", ["a_in_group", "b_in_group", "a_outside", "b_fusion"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["mmpareto", "dgl", "sum"])
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_non_finite_identical_on_every_backend(kind, bad, method, max_norm):
    _check_non_finite(kind, bad, method, max_norm, torch.float32)


# Half inputs: the CPU loops read finiteness off their fp64 sums of squares for these
# (csrc/cpu/kernels_impl.h, kCheckEach); every backend must still agree.
@pytest.mark.parametrize("kind", ["a_in_group", "b_in_group", "a_outside", "b_fusion"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["mmpareto", "dgl", "sum"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_non_finite_half_inputs_identical_on_every_backend(kind, bad, method, dtype):
    _check_non_finite(kind, bad, method, None, dtype)


def _check_non_finite(kind, bad, method, max_norm, dtype):
    a, b = _nonfinite_case(kind, bad, dtype)
    groups = [0, 1, -1, -1]
    fusion = [False, False, True, False] if method == "dgl" else None
    results = {}
    for backend in BACKENDS:
        out = [torch.full_like(x, 123.0) for x in a]
        stats = mmfast.combine_(out, a, b, method=method, groups=groups, fusion=fusion, max_norm=max_norm,
                                backend=backend)
        results[backend] = (out, stats)
    ref_out, ref_stats = results["torch"]
    assert not ref_stats.all_finite.item()
    for backend, (out, stats) in results.items():
        assert bool(stats.all_finite) == bool(ref_stats.all_finite), backend
        for t, (o, r) in enumerate(zip(out, ref_out)):
            for test in (torch.isnan, torch.isposinf, torch.isneginf):
                assert torch.equal(test(o), test(r)), f"{backend} out[{t}] {test.__name__}"
            fin = torch.isfinite(r)
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
            torch.testing.assert_close(o[fin], r[fin], **tol)
        for name in ("gram", "cos", "w_mm", "w_uni", "total_norm", "clip_coef"):
            x, y = getattr(stats, name), getattr(ref_stats, name)
            assert torch.equal(torch.isnan(x), torch.isnan(y)), f"{backend} {name}: {x} vs {y}"
        assert torch.equal(stats.conflict, ref_stats.conflict), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_propagates_a_non_finite_norm(backend, bad):
    # torch.nn.utils.clip_grad_norm_'s rule: a NaN norm gives a NaN coefficient (every
    # gradient NaN), an infinite one a 0 coefficient (Inf * 0 = NaN where the Inf was).
    def grads():
        g = [torch.ones(5), torch.ones(3)]
        g[1][1] = bad
        return g

    g = grads()
    stats = mmfast.clip_grad_norm_(g, 1.0, groups=[0, 1], backend=backend)
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in g]
    for p, x in zip(params, grads()):
        p.grad = x
    total = torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert not stats.all_finite.item()
    assert torch.equal(torch.isnan(stats.total_norm), torch.isnan(total)), (stats.total_norm, total)
    assert math.isnan(stats.clip_coef.item()) == math.isnan(bad)
    for x, p in zip(g, params):
        assert torch.equal(torch.isnan(x), torch.isnan(p.grad)), (backend, x, p.grad)
        fin = torch.isfinite(p.grad)
        torch.testing.assert_close(x[fin], p.grad[fin])


def test_constants_are_shared_with_the_extension():
    from mmfast.ops._backends import _C
    from mmfast.pytorch.reference import CHUNK

    if _C is None:
        pytest.skip("the C++ extension is not built")
    assert _C.constants() == {"chunk": float(CHUNK), "zero_tol": ZERO_TOL}
