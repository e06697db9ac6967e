"""The CUDA kernels of the K-objective path (csrc/cuda/multi.cu, csrc/cuda/weightings.cu)
against the CPU ones on the same inputs: gram_k, combine_k_, aggregate_k_, weighting,
aggregate_weights. Skipped without a GPU (make gpu-check runs them)."""
import pytest
import torch

import mmfast
from helpers import poisoned_like

weightings = pytest.importorskip("mmfast.weightings")
CUDA = mmfast.backends()["cuda"].available
pytestmark = pytest.mark.skipif(not CUDA, reason="cuda backend not available (needs a GPU and the CUDA build)")
ALL = sorted(weightings.WEIGHTINGS)
# chunk-crossing sizes, a size that is not a multiple of any vector width, an empty tensor
SHAPES = [(3,), (0,), (17,), (1025,), (5, 7, 3), (70001,)]
GROUPS = [0, -1, 0, 1, -1, 1]


def make(K, dtype, shapes=SHAPES, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return [[(b * (1.0 - 0.6 * k) + 0.5 * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype).to(device)
             for b, s in zip(base, shapes)] for k in range(K)]


def flat(grads):
    return [g for ts in zip(*grads) for g in ts]


def cuda(grads):
    return [[g.cuda() for g in gk] for gk in grads]


@pytest.mark.parametrize("K", [1, 2, 3, 5, 8, 9, 16, 17, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_gram_k(K, dtype):
    grads = make(K, dtype)
    G_cpu, f_cpu = torch.ops.mmfast.gram_k(flat(grads), K)
    G, f = torch.ops.mmfast.gram_k(flat(cuda(grads)), K)
    assert G.dtype == torch.float64 and G.shape == G_cpu.shape
    torch.testing.assert_close(G.cpu(), G_cpu, rtol=1e-12, atol=1e-12)  # fp64 sums, exact products
    assert bool(f) and bool(f_cpu)
    G2, _ = torch.ops.mmfast.gram_k(flat(cuda(grads)), K)
    assert torch.equal(G, G2)  # deterministic


@pytest.mark.parametrize("K", [2, 9])
def test_gram_k_non_finite(K):
    grads = cuda(make(K, torch.float32))
    grads[K - 1][5][12345] = float("inf")
    assert not bool(torch.ops.mmfast.gram_k(flat(grads), K)[1])


@pytest.mark.parametrize("K", [1, 2, 4, 8, 9, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("offset", [0, 1])  # 1: storage offset of one element, no 16-byte loads
def test_combine_k(K, dtype, offset):
    shapes = [(n + offset,) for n in (3, 0, 1025, 70001)]
    grads = [[g[offset:] for g in gk] for gk in make(K, dtype, shapes)]
    T = len(shapes)
    coefs = torch.randn(T, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out_cpu = poisoned_like(grads[0])
    sq_cpu = torch.ops.mmfast.combine_k_(out_cpu, flat(grads), K, coefs)
    g = cuda(grads)
    out = poisoned_like(g[0])
    sq = torch.ops.mmfast.combine_k_(out, flat(g), K, coefs.cuda())
    ulp = torch.finfo(dtype).eps  # fp64 sums in the same order, rounded once: fma contraction may differ
    for o, r in zip(out, out_cpu):
        torch.testing.assert_close(o.cpu(), r, rtol=ulp, atol=0)
    torch.testing.assert_close(sq.cpu(), sq_cpu, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("K", [1, 2, 3, 8, 17, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_weighting(name, K, dtype):
    gen = torch.Generator().manual_seed(K)
    J = torch.randn(5, K, max(K // 2, 1), dtype=torch.float64, generator=gen)  # rank-deficient for K > 1
    G = (J @ J.transpose(1, 2)).to(dtype)
    w_cpu = weightings.weights(name, G)
    w = weightings.weights(name, G.cuda())
    assert w.dtype == dtype and w.device.type == "cuda"
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(w.cpu(), w_cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("K", [2, 4, 8, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_aggregate(name, K, dtype):
    grads = make(K, dtype, seed=2)
    out_cpu = poisoned_like(grads[0])
    st_cpu = mmfast.aggregate_(out_cpu, grads, weighting=name, groups=GROUPS, backend="cpu")
    g = cuda(grads)
    out = poisoned_like(g[0])
    st = mmfast.aggregate_(out, g, weighting=name, groups=GROUPS, backend="cuda")
    torch.testing.assert_close(st.gram.cpu(), st_cpu.gram, rtol=1e-12, atol=1e-12)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(st.weights.cpu(), st_cpu.weights, rtol=tol, atol=tol)
    scale = max(o.abs().max().item() for o in out_cpu if o.numel())
    for o, r in zip(out, out_cpu):
        if o.numel():
            assert (o.cpu().double() - r.double()).abs().max().item() <= tol * scale
    torch.testing.assert_close(st.total_norm.cpu(), st_cpu.total_norm, rtol=tol, atol=0)
    assert bool(st.all_finite)


def test_aggregate_weights_op():
    K, T = 4, 6
    grads = make(K, torch.float64, seed=3)
    per, _ = torch.ops.mmfast.gram_k(flat(grads), K)
    from mmfast import _multi

    lay_cpu = _multi._layout(GROUPS, 2, torch.device("cpu"))
    lay = _multi._layout(GROUPS, 2, torch.device("cuda", torch.cuda.current_device()))
    args = weightings._solve.op_args("mmpareto", K, {})
    r_cpu = torch.ops.mmfast.aggregate_weights(per, lay_cpu.table, 2, "mmpareto", *args, 2.0 ** -53, 1.5)
    r = torch.ops.mmfast.aggregate_weights(per.cuda(), lay.table, 2, "mmpareto", *args, 2.0 ** -53, 1.5)
    for a, b in zip(r, r_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)
    assert r[2].shape == (T, K)


def test_aggregate_captured_in_graph():
    """No host sync and no host-to-device copy after the first call: capturable."""
    K = 3
    g = cuda(make(K, torch.float32, seed=5))
    out = [torch.empty_like(t) for t in g[0]]
    mmfast.aggregate_(out, g, weighting="upgrad", groups=GROUPS, backend="cuda")  # builds the layout
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        st = mmfast.aggregate_(out, g, weighting="upgrad", groups=GROUPS, backend="cuda")
    fresh = make(K, torch.float32, seed=6)
    for gk, fk in zip(g, fresh):
        for a, b in zip(gk, fk):
            a.copy_(b)
    graph.replay()
    ref = poisoned_like(fresh[0])
    st_ref = mmfast.aggregate_(ref, fresh, weighting="upgrad", groups=GROUPS, backend="cpu")
    torch.testing.assert_close(st.weights.cpu(), st_ref.weights, rtol=1e-5, atol=1e-6)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.cpu(), r, rtol=1e-4, atol=1e-5)
