"""The GPU backends (cuda, triton) against the reference, on a GPU (skipped elsewhere;
`make gpu-check` runs them). Issue 15: no host-to-device copy after the first call with a
layout, capture errors worded, device guard, the two passes, determinism."""
from __future__ import annotations

import pytest
import torch

import mmfast
from helpers import TOL, assert_close_to_reference, assert_stats_close, make_grads, reference64
from mmfast.ops._combine import combine_pass_, gram_pass

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GPU = [b for b in ("cuda", "triton") if mmfast.backends()[b].available] if torch.cuda.is_available() else []
SHAPES = [(64, 3, 7, 7), (7,), (40000,), (1,), (0,), (1000, 33), (65537,)]
GROUPS = [0, 1, 0, -1, 1, 3, 1]  # (group 2 empty)


def cuda(ts):
    return [t.cuda() for t in ts]


def unaligned(ts):
    """The same values at addresses that are not 16-byte aligned (the scalar path)."""
    out = []
    for t in ts:
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        v = buf[1:].view(t.shape)
        v.copy_(t)
        out.append(v)
    return out


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method", ["mmpareto", "dgl", "sum"])
@pytest.mark.parametrize("max_norm", [None, 1.0])
@pytest.mark.parametrize("align", [True, False])
def test_matches_reference(backend, dtype, method, max_norm, align):
    a, b = make_grads(SHAPES, dtype=dtype, seed=1)
    fusion = [False, False, False, True, False, False, False] if method == "dgl" else None
    kw = dict(groups=GROUPS, method=method, fusion=fusion, max_norm=max_norm, alpha=2.0 if method == "dgl" else 1.0)
    ref, ref_stats = reference64(a, b, **kw)
    a, b = cuda(a), cuda(b)
    if not align:
        a, b = unaligned(a), unaligned(b)
    out = [torch.full_like(x, float("nan")) for x in a]
    stats = mmfast.combine_(out, a, b, backend=backend, **kw)
    assert_close_to_reference([o.cpu() for o in out], ref, dtype)
    assert_stats_close(stats._replace(**{k: getattr(stats, k).cpu() for k in stats._fields if k != "names"}),
                       ref_stats, rtol=1e-6 if dtype != torch.float64 else 1e-12, dtype=dtype)


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("noise", [1e-1, 1e-2, 1e-3])
def test_strong_conflict(backend, noise):
    gen = torch.Generator().manual_seed(2)
    a = [torch.randn(s, generator=gen) for s in [(64, 3, 3, 3), (1001,), (512, 300)]]
    b = [(-3 * x.double() + noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)).float() for x in a]
    ref, _ = reference64(a, b, groups=[0, 0, 0])
    out = [torch.empty_like(x) for x in cuda(a)]
    mmfast.combine_(out, cuda(a), cuda(b), groups=[0, 0, 0], backend=backend)
    for o, r in zip(out, ref):
        assert abs(o.double().norm().item() / r.norm().item() - 1) <= 1e-5
    assert_close_to_reference([o.cpu() for o in out], ref, torch.float32)


@pytest.mark.parametrize("backend", GPU)
def test_non_finite_like_cpu(backend):
    a, b = make_grads([(100,), (40000,)], seed=3)
    a[1][7] = float("nan")
    b[0][3] = float("inf")
    want = [torch.empty_like(x) for x in a]
    ref = mmfast.combine_(want, a, b, groups=[0, 1], backend="torch")
    out = [torch.empty_like(x) for x in cuda(a)]
    stats = mmfast.combine_(out, cuda(a), cuda(b), groups=[0, 1], backend=backend)
    assert not bool(stats.all_finite) and not bool(ref.all_finite)
    for o, w in zip(out, want):
        assert torch.equal(o.cpu().isnan(), w.isnan())


@pytest.mark.parametrize("backend", GPU)
def test_deterministic(backend):
    a, b = cuda(make_grads(SHAPES, seed=4)[0]), cuda(make_grads(SHAPES, seed=5)[0])
    o1, o2 = [torch.empty_like(x) for x in a], [torch.empty_like(x) for x in a]
    s1 = mmfast.combine_(o1, a, b, groups=GROUPS, backend=backend)
    s2 = mmfast.combine_(o2, a, b, groups=GROUPS, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(o1, o2))
    assert torch.equal(s1.gram, s2.gram) and torch.equal(s1.total_norm, s2.total_norm)


@pytest.mark.parametrize("backend", GPU)
def test_no_host_to_device_copy_after_first_call(backend):
    a, b = cuda(make_grads(SHAPES, seed=6)[0]), cuda(make_grads(SHAPES, seed=7)[0])
    out = [torch.empty_like(x) for x in a]
    calls = [lambda: mmfast.combine_(out, a, b, groups=GROUPS, backend=backend, max_norm=1.0),
             lambda: mmfast.combine_(out, a, b, groups=GROUPS, method="sum", backend=backend)]
    if backend == "cuda":
        calls.append(lambda: mmfast.clip_grad_norm_(out, 0.5, groups=GROUPS, backend="cuda"))
    for call in calls:
        call()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for call in calls:
            call()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    h2d = [n for n in names if "HtoD" in n or "Memcpy" in n and "DtoD" not in n]
    assert not h2d, f"{backend}: host-to-device copies after the first call: {h2d}"
    syncs = [n for n in names if "cudaStreamSynchronize" in n or "cudaMemcpy" == n]
    assert not syncs, syncs


def test_cuda_launch_count():
    if "cuda" not in GPU:
        pytest.skip("cuda backend not built")
    a, b = cuda(make_grads(SHAPES, seed=8)[0]), cuda(make_grads(SHAPES, seed=9)[0])
    out = [torch.empty_like(x) for x in a]
    from torch.profiler import ProfilerActivity, profile

    expected = {("mmpareto", None): 4, ("sum", None): 2, ("mmpareto", 1.0): 5}
    for (method, max_norm), n in expected.items():
        mmfast.combine_(out, a, b, groups=GROUPS, method=method, backend="cuda", max_norm=max_norm)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            mmfast.combine_(out, a, b, groups=GROUPS, method=method, backend="cuda", max_norm=max_norm)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "Memset" not in e.name]
        assert len(kernels) == n, (method, max_norm, [e.name for e in kernels])


def test_new_layout_inside_capture_is_a_clear_error():
    if "cuda" not in GPU:
        pytest.skip("cuda backend not built")
    a, b = cuda(make_grads([(10,), (20,)], seed=10)[0]), cuda(make_grads([(10,), (20,)], seed=11)[0])
    out = [torch.empty_like(x) for x in a]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="run the op once before capturing"):
        with torch.cuda.graph(graph):
            mmfast.combine_(out, a, b, backend="cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU)
def test_device_guard(backend):
    a, b = make_grads([(100,), (33000,)], seed=12)
    ref, _ = reference64(a, b)
    a, b = [x.to("cuda:1") for x in a], [x.to("cuda:1") for x in b]
    out = [torch.empty_like(x) for x in a]
    with torch.cuda.device(0):
        mmfast.combine_(out, a, b, backend=backend)
    assert_close_to_reference([o.cpu() for o in out], ref, torch.float32)


def test_two_passes_on_cuda():
    if "cuda" not in GPU:
        pytest.skip("cuda backend not built")
    a, b = cuda(make_grads(SHAPES, seed=13)[0]), cuda(make_grads(SHAPES, seed=14)[0])
    want = [torch.empty_like(x) for x in a]
    ref = mmfast.combine_(want, a, b, groups=GROUPS, backend="cuda")
    got = [torch.empty_like(x) for x in a]
    stats, out_sq = combine_pass_(got, a, b, gram_pass(a, b), GROUPS)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(stats.gram, ref.gram)
    assert torch.allclose(out_sq.sum().sqrt(), ref.total_norm, rtol=1e-12)


@pytest.mark.parametrize("backend", [b for b in GPU if b == "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_matches_torch(backend, dtype):
    a, _ = make_grads(SHAPES, dtype=dtype, seed=15)
    want = [x.clone() for x in a]
    ref = mmfast.clip_grad_norm_(want, 1.0, groups=GROUPS, backend="torch")
    got = cuda(a)
    stats = mmfast.clip_grad_norm_(got, 1.0, groups=GROUPS, backend=backend)
    for g, w in zip(got, want):
        assert torch.allclose(g.cpu().double(), w.double(), rtol=TOL[dtype][0] * 10, atol=1e-7)
    assert torch.allclose(stats.total_norm.cpu(), ref.total_norm, rtol=1e-6)
    assert torch.allclose(stats.group_sq.cpu(), ref.group_sq, rtol=1e-6)
