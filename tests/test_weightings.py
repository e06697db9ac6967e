"""mmfast.weightings: Gram -> weights, against fp64 references computed on the gradient
matrix J itself (exact active-set enumeration, a literal PCGrad loop, numpy's pinv),
KKT conditions on random, rank-deficient and adversarial Gram matrices, property checks
(torchjd's: non-conflicting, permutation invariance, linearity under scaling,
stationarity) in float32 and float64, batching, scale, no host sync, and torchjd where
it is installed."""
import ast
import inspect
import itertools
import math

import numpy as np
import pytest
import torch

from mmfast import weightings as W
from mmfast.weightings import reference as R

KS = (2, 3, 5, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems are K x K: with 2 intra-op threads every batched LAPACK call
    (torch.linalg.solve_ex) wakes the thread pool, which costs milliseconds on a busy
    2-core machine and would dominate this file's run time. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
KINDS = ("random", "rankdef", "nearpar", "opposite", "zero", "dup")
ALL = tuple(W.WEIGHTINGS)


# ---------------------------------------------------------------- gradient matrices

def make_J(kind, K, N=24, scale=1.0, seed=0):
    """A ``[K, N]`` float64 gradient matrix of the given kind, times ``scale``."""
    g = torch.Generator().manual_seed(1000 * K + 17 * KINDS.index(kind) + seed)
    J = torch.randn(K, N, generator=g, dtype=torch.float64)
    J = J * torch.rand(K, 1, generator=g, dtype=torch.float64).add(0.2)  # uneven norms
    if kind == "rankdef":  # rank max(1, K // 2) < K
        r = max(1, K // 2)
        J = torch.randn(K, r, generator=g, dtype=torch.float64) @ torch.randn(r, N, generator=g, dtype=torch.float64)
    elif kind == "nearpar":  # all within 1e-3 (relative) of one direction
        J = (1 + torch.rand(K, 1, generator=g, dtype=torch.float64)) * J[:1] + 1e-3 * J[:1].norm() * J / J.norm(dim=1, keepdim=True)
    elif kind == "opposite":
        J[1] = -J[0]
    elif kind == "zero":
        J[K - 1] = 0
    elif kind == "dup":
        J[K - 1] = J[0]
        if K >= 3:
            J[1] = 2.5 * J[0]
    return J * scale


def gram(J):
    return J @ J.T


def direction(name, J, **kw):
    return J.T @ W.weights(name, gram(J), **kw)


def rel(a, b, J):
    """max-abs difference relative to the gradients' Frobenius norm."""
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max() / J.norm().clamp(min=1e-300))


CASES = [(kind, K) for K in KS for kind in KINDS]
CASE_IDS = [f"{kind}-K{K}" for kind, K in CASES]


# ---------------------------------------------------------------- references (numpy, on J)

def ref_min_norm(J):
    """Exact min-norm point of conv(rows of J): every support's affine KKT system (lstsq),
    feasible ones kept, the smallest norm wins. Returns (d, alpha)."""
    J = np.asarray(J, dtype=np.float64)
    K = J.shape[0]
    scale = np.linalg.norm(J)
    Jn = J / (scale if scale > 0 else 1.0)
    G = Jn @ Jn.T
    best = None
    for r in range(1, K + 1):
        for S in itertools.combinations(range(K), r):
            S = list(S)
            A = np.zeros((r + 1, r + 1))
            A[:r, :r] = G[np.ix_(S, S)]
            A[:r, r] = A[r, :r] = 1.0
            rhs = np.zeros(r + 1)
            rhs[r] = 1.0
            a = np.zeros(K)
            a[S] = np.linalg.lstsq(A, rhs, rcond=None)[0][:r]
            if (a >= -1e-10).all() and abs(a.sum() - 1) < 1e-8:
                a = np.clip(a, 0, None)
                a /= a.sum()
                v = a @ G @ a
                if best is None or v < best[0]:
                    best = (v, a)
    a = best[1]
    return J.T @ a, a


def ref_box_projection(G, u):
    """Exact ``argmin_{v >= u} v^T G v`` by active-set enumeration (lstsq on the free set)."""
    K = G.shape[0]
    best = None
    for r in range(K + 1):
        for F in itertools.combinations(range(K), r):
            F = list(F)
            A = [j for j in range(K) if j not in F]
            v = u.copy()
            if F:
                rhs = -G[np.ix_(F, A)] @ u[A] if A else np.zeros(len(F))
                v[F] = np.linalg.lstsq(G[np.ix_(F, F)], rhs, rcond=None)[0]
            if (v >= u - 1e-10).all():
                val = v @ G @ v
                if best is None or val < best[0] - 1e-15:
                    best = (val, v)
    return best[1]


def ref_upgrad(J, reg_eps):
    """Sum over i of the projection of g_i / K onto the dual cone, in weight space, on
    ``G / tr(G) + reg_eps I`` (torchjd's normalize + regularize); returns d = J^T w."""
    J = np.asarray(J, dtype=np.float64)
    K = J.shape[0]
    G = J @ J.T
    tr = np.trace(G)
    Gr = G / (tr if tr > 0 else 1.0) + reg_eps * np.eye(K)
    w = sum(ref_box_projection(Gr, np.eye(K)[i] / K) for i in range(K))
    return J.T @ w


def ref_cagrad(J, c, norm_eps=1e-4):
    """CAGrad through its QP family: for lam > 0, g0 + lam g_w(lam) is the min-norm point of
    conv(g0 + lam g_k); the solution is the lam with lam |g_w(lam)| = c |g0| (bisection on
    log lam; lam |g_w| is nondecreasing). d = g0 + lam g_w, or 0 when |g_w| < norm_eps |J|."""
    J = np.asarray(J, dtype=np.float64)
    scale = np.linalg.norm(J)
    if scale == 0:
        return np.zeros(J.shape[1])
    Jn = J / scale
    g0 = Jn.mean(0)
    r = c * np.linalg.norm(g0)

    def solve(lam):
        _, a = ref_min_norm(g0 + lam * Jn)
        return Jn.T @ a

    lo, hi = -12.0, 12.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if 10 ** mid * np.linalg.norm(solve(10 ** mid)) < r:
            lo = mid
        else:
            hi = mid
    lam = 10 ** hi
    gw = solve(lam)
    if np.linalg.norm(gw) < norm_eps:
        return np.zeros(J.shape[1])
    return (g0 + r * gw / np.linalg.norm(gw)) * scale


def ref_pcgrad(J, orders):
    """Literal PCGrad on the gradient vectors (torchjd's loop), summed."""
    J = np.asarray(J, dtype=np.float64)
    out = np.zeros(J.shape[1])
    for i, order in enumerate(orders):
        g = J[i].copy()
        for j in order:
            if j == i:
                continue
            ip = g @ J[j]
            if ip < 0:
                g = g - ip / (J[j] @ J[j]) * J[j]
        out += g
    return out


def ref_imtlg(J, rcond=None):
    J = np.asarray(J, dtype=np.float64)
    G = J @ J.T
    G = G / np.trace(G)
    rcond = G.shape[0] * 2.0 ** -53 if rcond is None else rcond  # torch.linalg.pinv's default
    v = np.linalg.pinv(G, rcond=rcond, hermitian=True) @ np.sqrt(np.clip(np.diag(G), 0, None))
    if abs(v.sum()) < 1e-12:
        return np.zeros(J.shape[1])
    return J.T @ (v / v.sum())


def semantics_w_mm(AA, AB, BB):
    """docs/semantics.md's two-objective MMPareto weight, transcribed."""
    if AB > 0:
        return 0.5
    if AB >= AA:
        return 0.999
    if AB >= BB:
        return 0.001
    return (BB - AB) / (AA + BB - 2 * AB)


# ---------------------------------------------------------------- against the references

@pytest.mark.parametrize("scale", (1e-8, 1.0, 1e8))
@pytest.mark.parametrize("kind,K", CASES, ids=CASE_IDS)
def test_mgda_is_the_min_norm_point(kind, K, scale):
    J = make_J(kind, K, scale=scale)
    w = W.mgda(gram(J))
    d = J.T @ w
    d_ref, _ = ref_min_norm(J.numpy())
    tol = 1e-12
    assert rel(d, d_ref, J) < tol
    assert abs(float(d @ d) - float(d_ref @ d_ref)) <= tol * float(J.norm()) ** 2
    # in the convex hull, and non-conflicting: <d, g_k> >= |d|^2 >= 0 for every k
    assert float(w.min()) >= -1e-12 and abs(float(w.sum()) - 1) < 1e-12
    assert float((J @ d - d @ d).min()) >= -tol * float(J.norm()) ** 2


@pytest.mark.parametrize("kind,K", CASES, ids=CASE_IDS)
def test_upgrad_against_exact_projection(kind, K):
    J = make_J(kind, K)
    tr = float(J.norm()) ** 2
    for reg, tol in ((1e-4, 1e-12), (1e-12, 1e-10)):  # torchjd's default; (nearly) the exact projection
        w = W.upgrad(gram(J), reg_eps=reg)
        assert rel(J.T @ w, ref_upgrad(J.numpy(), reg), J) < tol
        # non-conflicting, up to what the regularisation allows: (Gw)_k >= -reg tr(G) w_k
        assert float((J @ (J.T @ w) + reg * tr * w.abs()).min()) >= -1e-8 * tr


@pytest.mark.parametrize("kind,K", [c for c in CASES if c[1] <= 5], ids=[i for c, i in zip(CASES, CASE_IDS) if c[1] <= 5])
def test_cagrad_against_qp_family_reference(kind, K):
    J = make_J(kind, K)
    assert rel(direction("cagrad", J), ref_cagrad(J.numpy(), 0.5), J) < 1e-10
    # c = 0 is the mean (or 0 at a Pareto-stationary point); rescale divides by 1 + c^2 or 1 + c
    d0 = direction("cagrad", J, c=0.0)
    assert rel(d0, J.mean(0), J) < 1e-9 or float(d0.abs().max()) == 0
    G = gram(J)
    assert torch.allclose(W.cagrad(G, c=0.4, rescale=1), W.cagrad(G, c=0.4) / 1.16, rtol=1e-12, atol=0)
    assert torch.allclose(W.cagrad(G, c=0.4, rescale=2), W.cagrad(G, c=0.4) / 1.4, rtol=1e-12, atol=0)


@pytest.mark.parametrize("scale", (1e-8, 1.0, 1e8))
@pytest.mark.parametrize("kind,K", CASES, ids=CASE_IDS)
def test_pcgrad_against_literal_loop(kind, K, scale):
    J = make_J(kind, K, scale=scale)
    for seed in (0, 3):
        orders = W._pcgrad_orders(K, seed)
        assert rel(direction("pcgrad", J, seed=seed), ref_pcgrad(J.numpy(), orders), J) < 1e-13
    rev = [list(reversed(range(K)))] * K  # an explicit order
    assert rel(direction("pcgrad", J, orders=rev), ref_pcgrad(J.numpy(), rev), J) < 1e-13


def test_pcgrad_orders():
    # seeded, deterministic, and exactly the draws torchjd makes after torch.manual_seed
    assert W._pcgrad_orders(5, 0) == W._pcgrad_orders(5, 0)
    assert W._pcgrad_orders(5, 0) != W._pcgrad_orders(5, 1)
    torch.manual_seed(7)
    assert W._pcgrad_orders(6, 7) == tuple(tuple(torch.randperm(6).tolist()) for _ in range(6))
    with pytest.raises(ValueError, match="orders"):
        W.pcgrad(torch.eye(3, dtype=torch.float64), orders=[[0, 1], [1, 0], [2, 1, 0]])


@pytest.mark.parametrize("scale", (1e-8, 1.0, 1e8))
@pytest.mark.parametrize("kind,K", CASES, ids=CASE_IDS)
def test_imtlg_against_pinv(kind, K, scale):
    J = make_J(kind, K, scale=scale)
    d = direction("imtlg", J)
    # nearpar: G's condition number is ~1e12, so two exact pseudo-inverses differ by
    # ~1e-16 * 1e12 * |J|; everywhere else to rounding.
    assert rel(d, ref_imtlg(J.numpy()), J) < (1e-8 if kind == "nearpar" else 1e-12)
    if kind == "random":  # linearly independent: equal projections on the unit gradients
        proj = (J / J.norm(dim=1, keepdim=True)) @ d
        assert float(proj.max() - proj.min()) < 1e-9 * float(proj.abs().max())


# ---------------------------------------------------------------- mmpareto

def test_mmpareto_two_objectives_is_semantics():
    g = torch.Generator().manual_seed(5)
    grams = []
    for _ in range(200):
        J = torch.randn(2, 6, generator=g, dtype=torch.float64) * torch.rand(2, 1, generator=g, dtype=torch.float64)
        grams.append(gram(J))
    grams += [torch.tensor(x, dtype=torch.float64) for x in (
        [[0.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]],  # zero gradients
        [[1.0, -1.0], [-1.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]],  # opposite, orthogonal (conflict)
        [[4.0, -2e-3], [-2e-3, 1e-6]], [[1e-6, -2e-4], [-2e-4, 1.0]])]  # interior near the clamp
    batched = W.mmpareto(torch.stack(grams))
    for G, wb in zip(grams, batched):
        w_mm = semantics_w_mm(float(G[0, 0]), float(G[0, 1]), float(G[1, 1]))
        w = W.mmpareto(G)
        assert w.tolist() == [w_mm, 1 - w_mm]  # exact, both single and batched
        assert torch.equal(wb, w)
        assert W.mmpareto(G.flip(0, 1), main=1).tolist() == [1 - w_mm, w_mm]


@pytest.mark.parametrize("kind,K", [c for c in CASES if c[1] >= 3], ids=[i for c, i in zip(CASES, CASE_IDS) if c[1] >= 3])
def test_mmpareto_generalisation(kind, K):
    J = make_J(kind, K)
    G = gram(J)
    for main in (0, K - 1):
        w = W.mmpareto(G, main=main)
        assert abs(float(w.sum()) - 1) < 1e-12
        n = K * (J.T @ w)
        conflict = [j for j in range(K) if j != main and G[main, j] <= 0]
        others = [j for j in range(K) if j != main and j not in conflict]
        assert torch.allclose(w[others], torch.full((len(others),), 1.0 / K, dtype=torch.float64))
        if not conflict:
            assert torch.allclose(w, torch.full((K,), 1.0 / K, dtype=torch.float64))
        elif len(conflict) == 1:
            j = conflict[0]
            w_mm = semantics_w_mm(float(G[main, main]), float(G[main, j]), float(G[j, j]))
            assert math.isclose(float(w[main]), 2 / K * w_mm, rel_tol=1e-14)
            assert math.isclose(float(w[j]), 2 / K * (1 - w_mm), rel_tol=1e-14)
        else:
            S = [main] + conflict
            n_S, _ = ref_min_norm(J[S].numpy())
            n_ref = len(S) * torch.as_tensor(n_S) + J[others].sum(0)
            zero_vertex = any(float(G[k, k]) <= 1e-300 for k in S)
            if not zero_vertex:
                assert rel(n, n_ref, J) < 1e-9
        # never conflicts with the main gradient (beyond the solver's tolerance)
        assert float(J[main] @ n) >= -1e-9 * float(J.norm()) ** 2


def test_mmpareto_vertex_rule():
    # K = 4, main 0 conflicting with 1 and 2, 2 is the zero gradient: min-norm point is g_2
    J = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    w = W.mmpareto(gram(J))
    expected = torch.tensor([0.001, 0.001, 1 - 0.002, 1.0], dtype=torch.float64) * torch.tensor([3 / 4, 3 / 4, 3 / 4, 1 / 4], dtype=torch.float64)
    assert torch.allclose(w, expected, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="main"):
        W.mmpareto(gram(J), main=4)


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize("name", [n for n in ALL if n != "pcgrad"])
@pytest.mark.parametrize("kind,K", [c for c in CASES if c[1] in (3, 5)], ids=[i for c, i in zip(CASES, CASE_IDS) if c[1] in (3, 5)])
def test_permutation_invariance(name, kind, K):
    J = make_J(kind, K)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(K))
    main = 1
    kw = {"main": main} if name == "mmpareto" else {}
    kwp = {"main": perm.tolist().index(main)} if name == "mmpareto" else {}
    w = W.weights(name, gram(J), **kw)
    wp = W.weights(name, gram(J[perm]), **kwp)
    # the direction is the same (weights can be non-unique when G is rank-deficient) ...
    assert rel(J[perm].T @ wp, J.T @ w, J) < 1e-8
    if kind == "random":  # ... and so are the weights where they are unique
        assert torch.allclose(wp, w[perm], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", KINDS)
def test_scale_linearity(name, kind):
    K = 5
    J = make_J(kind, K)
    d1 = direction(name, J)
    for c in (1e-8, 1e8):
        dc = direction(name, J * c)
        assert rel(dc / c, d1, J) < 1e-8, c


@pytest.mark.parametrize("name", ALL)
def test_batched_equals_per_group(name):
    """A batch of Gram matrices gives what each one gives alone.

    Compared where the answer is unique: the direction ``d = J^T w`` always, the weights
    only for full-rank J (``random``). For rank-deficient or duplicated gradients the
    optimal weights form a set (MGDA with two equal rows: any split between them), and
    the batched and the single LAPACK calls may land on different members of it.
    Bound: the solvers reach ``d`` to about 1e-11 of ``|J|_F`` (weightings.py); the two
    call paths round differently, amplified by the conditioning of G (up to ~1e6 for
    the ``nearpar`` case: 1e-16 * 1e6), so 1e-9 of ``|J|_F`` leaves a margin of 10 over
    both; a wrong batch index or mixed-up group gives O(1).
    """
    K = 4
    Js = [make_J(kind, K, seed=s) * 10.0 ** (s - 2) for s, kind in enumerate(KINDS)]
    Gs = torch.stack([gram(J) for J in Js])
    wb = W.weights(name, Gs)
    assert wb.shape == (len(Js), K) and wb.dtype == torch.float64
    for kind, J, G, w in zip(KINDS, Js, Gs, wb):
        assert torch.equal(w, W.weights(name, G)), kind  # the same solver per group: the same bits
    w2 = W.weights(name, Gs[:4].reshape(2, 2, K, K))  # more than one leading dim
    assert torch.equal(w2.reshape(4, K), wb[:4])


@pytest.mark.parametrize("name", ALL)
def test_degenerate_inputs(name):
    for K in (1, 2, 3):
        w = W.weights(name, torch.zeros(K, K, dtype=torch.float64))  # all gradients zero
        assert w.shape == (K,) and bool(torch.isfinite(w).all())
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        w = W.weights(name, torch.ones(1, 1, dtype=dtype))  # weights in G's dtype
        assert w.dtype == dtype and w.shape == (1,)
    w = W.weights(name, torch.ones(0, 3, 3))  # an empty batch
    assert w.shape == (0, 3)
    with pytest.raises(ValueError):
        W.weights(name, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError):
        W.weights(name, torch.zeros(2, 2, dtype=torch.int64))


def test_registry():
    assert set(W.WEIGHTINGS) == {"mgda", "pcgrad", "cagrad", "imtlg", "upgrad", "mmpareto"}
    with pytest.raises(ValueError, match="mgda.*upgrad"):
        W.weights("nash", torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ALL)
def test_reference_agrees(name):
    """The pure-PyTorch fallback (reference.py, an interior point) answers close to the
    exact solvers: it stays usable where no kernel exists."""
    for kind in ("random", "rankdef", "opposite"):
        J = make_J(kind, 4)
        w = W.weights(name, gram(J))
        kw = {"rcond": 4 * 2.0 ** -53} if name == "imtlg" else {}
        assert rel(J.T @ R.weights(name, gram(J), **kw), J.T @ w, J) < 1e-6, kind


def test_bad_keywords():
    with pytest.raises(TypeError, match="unexpected keyword argument 'iters'"):
        W.weights("mgda", torch.eye(2), iters=20)
    with pytest.raises(ValueError, match="c: expected"):
        W.cagrad(torch.eye(2), c=-1.0)
    with pytest.raises(ValueError, match="rescale"):
        W.cagrad(torch.eye(2), rescale=3)
    with pytest.raises(ValueError, match="reg_eps"):
        W.upgrad(torch.eye(2), reg_eps=float("nan"))
    with pytest.raises(ValueError, match="main"):
        W.mmpareto(torch.eye(2), main=2)


# ---------------------------------------------------------------- no host sync

SYNC_CALLS = {"item", "tolist", "cpu", "numpy", "float", "bool", "int", "nonzero"}
HOST_ONLY = {"_pcgrad_orders_cached", "_number", "_orders_table", "_op_args_cached"}  # host values only  # draws permutations with a CPU generator: no device data


@pytest.mark.parametrize("module", ["reference", "_solve"])
def test_no_sync_calls_in_source(module):
    import importlib

    tree = ast.parse(inspect.getsource(importlib.import_module(f"mmfast.weightings.{module}")))
    bad = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or fn.name in HOST_ONLY:
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if name in SYNC_CALLS:
                    bad.append(f"{fn.name}:{node.lineno}: {name}(")
    assert not bad, bad


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("K", (2, 5))
def test_no_host_read_on_meta_device(name, K):
    """A meta tensor has no data: .item(), bool(), float(), .tolist(), nonzero() and
    data-dependent shapes all raise on it. Every weighting runs there, batched, so none
    reads a device value on the host (on a GPU: none synchronises). The CPU stand-in for
    torch.cuda.set_sync_debug_mode, which needs a GPU."""
    G = torch.empty(3, K, K, dtype=torch.float64, device="meta")
    kw = {"main": K - 1} if name == "mmpareto" else {}
    w = W.weights(name, G, **kw)
    assert w.device.type == "meta" and w.shape == (3, K) and w.dtype == torch.float64
    w = W.weights(name, G.float(), **kw)
    assert w.device.type == "meta" and w.shape == (3, K) and w.dtype == torch.float32
    with pytest.raises((RuntimeError, NotImplementedError)):
        G.sum().item()  # the check has teeth


@pytest.mark.parametrize("name", ALL)
def test_fullgraph_compile(name):
    """torch.compile(fullgraph=True) works (the fused path runs inside compiled training
    steps) and a Python branch on a tensor value would be a graph break, i.e. an error
    here. (Dynamo 2.13 captures .item() instead of breaking: the meta-device test and the
    source check cover that.) The 'eager' backend runs Dynamo's tracing without
    Inductor's code generation. Each weighting is one op in the graph."""
    torch._dynamo.reset()
    kw = {}
    G = gram(make_J("random", 4))
    fn = torch.compile(lambda g: W.weights(name, g, **kw), fullgraph=True, backend="eager")
    assert torch.equal(fn(G), W.weights(name, G, **kw))


# ---------------------------------------------------------------- torchjd (test-only extra)

TJD_CASES = [(kind, K) for K in KS for kind in ("random", "rankdef", "opposite", "zero", "dup")]


def _torchjd(name):
    agg = pytest.importorskip("torchjd.aggregation")
    try:
        return {"upgrad": agg.UPGrad, "mgda": agg.MGDA, "pcgrad": agg.PCGrad, "imtlg": agg.IMTLG,
                "cagrad": lambda: agg.CAGrad(c=0.5)}[name]()
    except ImportError as e:  # an optional solver (quadprog, cvxpy) is missing
        pytest.skip(f"torchjd {name}: {e}")


@pytest.mark.parametrize("name", ["upgrad", "pcgrad", "imtlg", "cagrad", "mgda"])
@pytest.mark.parametrize("kind,K", TJD_CASES, ids=[f"{k}-K{K}" for k, K in TJD_CASES])
def test_matches_torchjd(name, kind, K):
    A = _torchjd(name)
    J = make_J(kind, K)
    J = J / J.norm(dim=1).max()  # gradients of norm <= 1: atol 1e-4 is meaningful
    torch.manual_seed(0)  # PCGrad's order: the same draws as pcgrad(seed=0)
    d_tjd = A(J)
    d = direction(name, J)
    if name == "mgda" and K > 2:
        # torchjd's Frank-Wolfe stops early (step < 1e-3, <= 100 steps): ours is the exact
        # min-norm point, so its norm is never larger; the directions agree where FW converged.
        assert float(d.norm()) <= float(d_tjd.norm()) + 1e-7
        assert rel(d, torch.as_tensor(ref_min_norm(J.numpy())[0]), J) < 1e-6
        return
    # Exact solvers on both sides (quadprog, pinv, the literal loop): to rounding. CAGrad:
    # torchjd's CLARABEL solve is accurate to about 1e-5 (the old bound here was 1e-4).
    tol = 3e-5 if name == "cagrad" else 1e-12
    assert torch.allclose(d, d_tjd, atol=tol, rtol=0), float((d - d_tjd).abs().max())


# ---------------------------------------------------------------- KKT conditions (exactness)

def adversarial_grams():
    """Gram matrices built to stress active-set solvers: (name, G [K, K] float64)."""
    g = torch.Generator().manual_seed(11)
    out = []
    for K in (2, 3, 4, 8, 16, 32):
        J = torch.randn(K, 3 * K, generator=g, dtype=torch.float64)
        out.append((f"random{K}", gram(J)))
        out.append((f"rank2-{K}", gram(torch.randn(K, 2, generator=g, dtype=torch.float64)
                                       @ torch.randn(2, 40, generator=g, dtype=torch.float64))))
        Jd = J.clone()
        Jd[K // 2:] = -Jd[: K - K // 2] * torch.rand(K - K // 2, 1, generator=g, dtype=torch.float64)  # opposite pairs
        out.append((f"opposite{K}", gram(Jd)))
        scales = 10.0 ** torch.linspace(-6, 6, K, dtype=torch.float64)  # norms over 12 decades
        out.append((f"scales{K}", gram(J * scales[:, None])))
        out.append((f"orthogonal{K}", torch.diag(torch.rand(K, generator=g, dtype=torch.float64) + 0.1)))
        near = J[:1] + 1e-7 * torch.randn(K, J.shape[1], generator=g, dtype=torch.float64)  # near-parallel
        out.append((f"nearpar{K}", gram(near)))
        dup = J[torch.arange(K) % 2]  # two gradients, each K/2 times
        out.append((f"dup{K}", gram(dup)))
    return out


ADV = adversarial_grams()


@pytest.mark.parametrize("case", range(len(ADV)), ids=[n for n, _ in ADV])
def test_mgda_kkt(case):
    """w in the simplex; (G w)_k >= w^T G w for every k (no vertex improves), with equality
    on the support: the KKT conditions of the min-norm problem, to fp64 rounding."""
    _, G = ADV[case]
    Gn = G / G.trace()
    w = W.mgda(G)
    tol = 1e-13 * G.shape[0]
    assert float(w.min()) >= 0 and abs(float(w.sum()) - 1) < 1e-14
    v, ww = Gn @ w, w @ Gn @ w
    assert float((v - ww).min()) >= -tol
    assert float(((v - ww) * (w > 0)).abs().max()) <= tol


@pytest.mark.parametrize("case", range(len(ADV)), ids=[n for n, _ in ADV])
@pytest.mark.parametrize("c", (0.4, 0.9, 2.0))
def test_cagrad_kkt(case, c):
    """w* (recovered from w = 1/K + (r/|g_w*|) w*) satisfies the KKT conditions of
    min b^T w + r sqrt(w^T G w) over the simplex, or the optimum is at g_w = 0."""
    _, G = ADV[case]
    K = G.shape[0]
    Gn = G / G.trace()
    w = W.cagrad(G, c=c, norm_eps=0.0)
    b = Gn.mean(1)
    r = c * float(b.mean().clamp(min=0).sqrt())
    if float(w.abs().max()) == 0:  # g_w* = 0: F >= F(g_w = 0) = 0 must hold at the MGDA point
        return
    ws = w - 1.0 / K
    ws = ws / ws.sum()
    q = float((ws @ Gn @ ws).sqrt())
    if q < 1e-6:
        return  # a Pareto-stationary answer (see cagrad's docstring)
    grad = b + r * (Gn @ ws) / q
    nu = float((grad * ws).sum())
    assert float(ws.min()) >= -1e-12
    assert float((grad - nu).min()) >= -1e-10
    assert float(((grad - nu) * (ws > 1e-12)).abs().max()) <= 1e-10


@pytest.mark.parametrize("case", range(len(ADV)), ids=[n for n, _ in ADV])
def test_upgrad_kkt(case):
    """UPGrad's d: against the exact projection where enumeration is cheap (K <= 8); every
    case non-conflicting up to what reg_eps allows, and permutation-equivariant."""
    name, G = ADV[case]
    K = G.shape[0]
    Gn = G / G.trace()
    w = W.upgrad(G)
    assert float((Gn @ w + 1e-4 * w.abs()).min()) >= -1e-12
    if K <= 8:
        Q = Gn.numpy() + 1e-4 * np.eye(K)
        w_ref = sum(ref_box_projection(Q, np.eye(K)[i] / K) for i in range(K))
        # compared as directions (|J^T dw| = sqrt(dw^T G dw)): along G's null space the
        # weights are fixed only by reg_eps, to about rounding / reg_eps (1e-12 here).
        # The enumeration keeps the first support within 1e-15 of the best objective, so on
        # these near-degenerate problems it is itself only that exact: |d| to ~sqrt(1e-15).
        dw = w.numpy() - w_ref
        assert math.sqrt(max(float(dw @ Gn.numpy() @ dw), 0.0)) <= 1e-7 * max(1.0, float(np.abs(w_ref).max()))
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(K))
    dw = W.upgrad(G[perm][:, perm]) - w[perm]  # the same direction
    assert float(dw @ Gn[perm][:, perm] @ dw) <= 1e-20 * max(1.0, float(w.abs().max())) ** 2


@pytest.mark.parametrize("name", ALL)
def test_k32_and_adversarial_finite(name):
    for case, G in ADV:
        w = W.weights(name, G)
        assert bool(torch.isfinite(w).all()), case
    G = torch.stack([G for _, G in ADV if G.shape[0] == 32])
    assert W.weights(name, G).shape == (G.shape[0], 32)


@pytest.mark.parametrize("name", ALL)
def test_non_finite_group_gets_nan(name):
    G = torch.stack([gram(make_J("random", 3)), gram(make_J("random", 3, seed=1))])
    G[1, 0, 1] = math.nan
    w = W.weights(name, G)
    assert bool(torch.isfinite(w[0]).all()) and bool(torch.isnan(w[1]).all())
    G[1, 0, 1] = math.inf
    assert bool(torch.isnan(W.weights(name, G)[1]).all())


@pytest.mark.parametrize("name", ALL)
def test_not_differentiated_through(name):
    """As torchjd's: constant weights for autograd (no graph, no non-finite gradients)."""
    J = make_J("random", 3).requires_grad_()
    w = W.weights(name, J @ J.T)
    assert not w.requires_grad
    (J.T @ w).sum().backward()
    assert bool(torch.isfinite(J.grad).all())


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name):
    G = torch.stack([gram(make_J(kind, 8)) for kind in KINDS])
    assert all(torch.equal(W.weights(name, G), W.weights(name, G)) for _ in range(3))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_scales(name, dtype, kind):
    """1e-15 .. 1e15: the weights do not move (trace normalisation), in float32 too."""
    J = make_J(kind, 5)
    w1 = W.weights(name, gram(J).to(dtype))
    for c in (1e-15, 1e15):
        G = gram(J * c)  # float64 products, then rounded: 1e30 fits float32
        wc = W.weights(name, G.to(dtype))
        assert wc.dtype == dtype and bool(torch.isfinite(wc).all())
        tol = 1e-10 if dtype == torch.float64 else 1e-3
        if name == "imtlg" and kind == "nearpar":  # G^+ with cond(G) ~ 1e12: rounding * 1e12
            tol = 1e-8 if dtype == torch.float64 else 1.0
        assert rel(J.T @ wc.double(), J.T @ w1.double(), J) < tol, c


@pytest.mark.parametrize("name", ["upgrad", "mgda", "imtlg"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("kind,K", [c for c in CASES if c[0] != "nearpar"], ids=[i for c, i in zip(CASES, CASE_IDS) if c[0] != "nearpar"])
def test_non_conflicting(name, dtype, kind, K):
    """torchjd's property: <d, g_k> >= 0 for every k (UPGrad up to its reg_eps). IMTL-G
    only for linearly independent gradients (on rank-deficient ones it conflicts, as
    torchjd's: the pseudo-inverse's sum(v) can be small)."""
    if name == "imtlg" and kind in ("rankdef", "dup", "opposite", "zero"):
        pytest.skip("IMTL-G is non-conflicting for linearly independent gradients only")
    J = make_J(kind, K).to(dtype).double()
    G = gram(J).to(dtype)
    d = J.T @ W.weights(name, G).double()
    tr = float(J.norm()) ** 2
    slack = 1e-4 * tr if name == "upgrad" else 0.0
    tol = (1e-12 if dtype == torch.float64 else 1e-5) * tr
    assert float((J @ d).min()) >= -slack - tol


@pytest.mark.parametrize("name", ["upgrad", "mgda"])
def test_stationarity(name):
    """torchjd's 'strongly stationary': d = 0 only when 0 is in the gradients' hull, and
    then it is (to rounding) 0."""
    kw = {"reg_eps": 1e-12} if name == "upgrad" else {}
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # 0 not in hull
    assert float((J.T @ W.weights(name, gram(J), **kw)).norm()) > 0.1
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)  # 0 inside
    assert float((J.T @ W.weights(name, gram(J), **kw)).norm()) < 1e-10


def test_imtlg_float32_rank_deficient():
    """Issue 16's case: float32 G of a rank-deficient J. The noise eigenvalues (~5e-9 of
    the trace) are below the float32 cutoff, so the answer is the float64 one."""
    for s in range(20):
        g = torch.Generator().manual_seed(s)
        J64 = torch.randn(4, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 3, generator=g, dtype=torch.float64)
        J = J64.float()
        d32 = J.T @ W.imtlg(J @ J.T)
        d64 = J64.T @ W.imtlg(J64 @ J64.T)
        assert float((d32.double() - d64).norm()) <= 1e-4 * float(J64.norm()), s


def test_cagrad_pareto_stationary_tie():
    """c = 1 on Pareto-stationary gradients: F >= 0 with the minimum 0 at g_w = 0 (a tie
    with the directions opposite to g_0): weights 0, as torchjd."""
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, 0.5]], dtype=torch.float64)
    for c in (1.0, 1.5, 3.0):
        assert float(W.cagrad(gram(J), c=c).abs().max()) == 0, c
    # c = 0: the mean (torchjd: the LP's vertex has |g_w| >= norm_eps, so 1/K + 0 w*)
    torch.testing.assert_close(W.cagrad(gram(J), c=0.0), torch.full((4,), 0.25, dtype=torch.float64))


def test_single_row():
    for name in ALL:
        for v in (0.0, 1e-30, 3.0, 1e30):
            w = W.weights(name, torch.tensor([[v]], dtype=torch.float64))
            assert w.shape == (1,) and bool(torch.isfinite(w).all()), (name, v)
