"""The pure-PyTorch weightings: the reference the exact solvers are tested against, and
the fallback where no mmfast kernel exists for G's device (no C++ extension, or a CUDA
tensor with a CPU-only build). Approximate (a fixed-budget interior point), always
float64, differentiable; ``mmfast.weightings`` is the public, exact version.

Gramian weightings for K objectives: ``G [..., K, K] -> w [..., K]``.

Each function maps the Gram matrix ``G = J J^T`` of K gradients (``J`` is ``K x N``,
never formed) to weights ``w`` such that the aggregated direction is
``d = J^T w = sum_k w_k g_k``. Everything is computed on ``G``:

* **No host synchronisation.** No ``.item()``, no Python branch on a tensor value, no
  data-dependent shape; the linear algebra is ``torch.linalg.solve_ex`` (which does not
  check errors on the host). Iterative methods run a fixed number of iterations (an
  argument); an iterate that has converged is frozen with ``torch.where``, so extra
  iterations are harmless. The functions trace under ``torch.compile(fullgraph=True)``.
* **Batched.** Any leading dims: ``[K, K] -> [K]``, ``[G, K, K] -> [G, K]``, ...
* **Scale.** ``G`` is symmetrised and divided by its trace (left as is when the trace is
  0) before anything else, as torchjd's ``normalize`` does, so the weights do not
  depend on the gradients' scale (1e-8 .. 1e8 tested) and ``d`` is linear in it:
  scaling every gradient by ``c`` scales ``d`` by ``c``.
* **Precision.** float64 throughout (the input is converted); the result is float64 on
  ``G``'s device.
* **Non-finite input.** A group whose Gram matrix has a NaN or an infinity gets NaN
  weights.

The iterative solver (MGDA, UPGrad, CAGrad, MMPareto with >= 2 conflicts) is a
primal-dual interior-point method on the K weights: two batched (K+1) x (K+1)
``solve_ex`` per iteration; Mehrotra predictor-corrector and a final exact active-set
step for the quadratic programs (MGDA, UPGrad), a vectorised line search for CAGrad's
non-quadratic objective. The default budget is 20 iterations (``iters``): on random,
rank-deficient, near-parallel, opposite, duplicated and zero gradients up to K = 8,
``d`` is then within about 1e-11 of ``|J|_F`` of the exact solution (15 iterations:
about 1e-6 in the worst, degenerate, cases).

Definitions follow torchjd (``torchjd.aggregation``, version 0.18) where it has the
method; where they differ it is said in the function.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["mgda", "pcgrad", "cagrad", "imtlg", "upgrad", "mmpareto", "WEIGHTINGS", "weights"]

ITERS = 20  # default iteration budget of the interior-point solver


def _normalise(G: torch.Tensor) -> torch.Tensor:
    """``G`` as float64, symmetrised, divided by its trace (a trace <= 0 leaves it as is)."""
    if G.ndim < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"G: expected a [..., K, K] Gram matrix, got shape {tuple(G.shape)}")
    if G.shape[-1] < 1:
        raise ValueError("G: expected K >= 1 objectives")
    G = G.to(torch.float64)
    G = 0.5 * (G + G.transpose(-1, -2))
    tr = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    scale = torch.where(tr > 0, tr, torch.ones_like(tr))
    return G / scale[..., None, None]


def _weighting(fn):
    """A public weighting: NaN weights for a group whose G is not finite."""
    @functools.wraps(fn)
    def wrapper(G: torch.Tensor, *args, **kw) -> torch.Tensor:
        w = fn(G, *args, **kw)
        return torch.where(torch.isfinite(G).all(-1).all(-1).unsqueeze(-1), w, math.nan)

    return wrapper


def _mv(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (A @ x.unsqueeze(-1)).squeeze(-1)


def _to_boundary(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Largest step ``a`` with ``v + a dv >= 0`` (``v > 0``), over the last dim (inf if none)."""
    ratio = torch.where(dv < 0, -v / torch.where(dv < 0, dv, -1.0), torch.full_like(v, math.inf))
    return ratio.amin(-1, keepdim=True)


_LS_STEPS = 10  # candidate step lengths of the line search: a_max * 2^-k, k < 10


def _ipm(oracle, lower: torch.Tensor, *, simplex: bool, iters: int, mask: torch.Tensor | None = None,
         merit=None, tol: float = 1e-15) -> torch.Tensor:
    """Primal-dual interior point for ``min f(x) s.t. x >= lower [, sum(x) = 1]``.

    ``oracle(x, mu) -> (grad, hess)`` of the convex objective f (``mu``: the current
    complementarity, for objectives smoothed along the path); batched over the leading
    dims of ``lower [..., n]``. ``mask`` (bool, optional) keeps the masked-out variables
    at 0 (excluded from the problem, and from the sum). For a quadratic f: Mehrotra
    predictor-corrector, step 0.99 of the way to the boundary. For a general smooth
    convex f pass ``merit(x, mu) -> f(x)`` (any leading dims): the centred direction (no
    second-order correction, so it is a descent direction of the barrier function
    ``f - sigma mu sum(log s)``) and the best of ``_LS_STEPS`` halvings of the step on
    that function, evaluated all at once; without it Newton can cycle on a non-quadratic
    f. A fixed number of iterations; a batch element whose complementarity falls below
    ``tol`` with a small dual residual (or whose step is not finite) stops moving.
    """
    n = lower.shape[-1]
    dt, dev = lower.dtype, lower.device
    act = torch.ones_like(lower) if mask is None else mask.to(dt)
    n_act = act.sum(-1, keepdim=True).clamp(min=1.0)
    # x = base + s; masked-out variables: base = -1, s = 1, so x = 0 and they never move.
    base = torch.where(act > 0, lower, -1.0)
    if simplex:
        s = torch.where(act > 0, act / n_act - lower, 1.0)
    else:
        s = torch.where(act > 0, torch.full_like(lower, 1.0 / n), 1.0)
    z = torch.ones_like(lower)
    y = lower.new_zeros(lower.shape[:-1] + (1,))
    done = torch.zeros(lower.shape[:-1] + (1,), dtype=torch.bool, device=dev)
    off = torch.diag_embed(1.0 - act)
    pair = act.unsqueeze(-1) * act.unsqueeze(-2)
    if merit is not None:
        halvings = 0.5 ** torch.arange(_LS_STEPS, dtype=dt, device=dev)
        halvings = halvings.reshape((_LS_STEPS,) + (1,) * lower.ndim)
    for _ in range(iters):
        x = base + s
        mu = (s * z * act).sum(-1, keepdim=True) / n_act
        grad, hess = oracle(x, mu)
        rd = (grad - z - (y if simplex else 0.0)) * act
        M = hess * pair + torch.diag_embed(act * z / s) + off
        if simplex:
            rp = (x * act).sum(-1, keepdim=True) - 1.0
            top = torch.cat([M, act.unsqueeze(-1)], -1)
            bottom = torch.cat([act.unsqueeze(-2), lower.new_zeros(lower.shape[:-1] + (1, 1))], -1)
            A = torch.cat([top, bottom], -2)
        else:
            A = M

        def direction(rc):
            r1 = (rc / s - rd) * act
            rhs = torch.cat([r1, -rp], -1) if simplex else r1
            sol, info = torch.linalg.solve_ex(A, rhs.unsqueeze(-1))
            sol = sol.squeeze(-1)
            dx = sol[..., :n] * act
            dy = -sol[..., n:] if simplex else None
            dz = (rc - z * dx) / s * act
            return dx, dy, dz, info

        dx, dy, dz, info1 = direction(-s * z)  # predictor (affine scaling)
        a = torch.minimum(_to_boundary(s, dx), _to_boundary(z, dz)).clamp(max=1.0)
        mu_aff = ((s + a * dx) * (z + a * dz) * act).sum(-1, keepdim=True) / n_act
        sigma = (mu_aff / mu.clamp(min=1e-300)).clamp(0.0, 1.0) ** 3
        if merit is None:
            dx, dy, dz, info2 = direction(sigma * mu - s * z - dx * dz)  # Mehrotra corrector
            a_p = a_d = (0.99 * torch.minimum(_to_boundary(s, dx), _to_boundary(z, dz))).clamp(max=1.0)
        else:
            target = sigma * mu
            dx, dy, dz, info2 = direction(target - s * z)
            a_d = (0.99 * _to_boundary(z, dz)).clamp(max=1.0)
            steps = halvings * (0.99 * _to_boundary(s, dx)).clamp(max=1.0)  # [L, ..., 1]
            sc = s + steps * dx
            phi = merit(base + sc, mu) - target.squeeze(-1) * (act * sc.log()).sum(-1)  # [L, ...]
            phi = torch.where(torch.isfinite(phi), phi, math.inf)
            a_p = steps.gather(0, phi.argmin(0, keepdim=True).unsqueeze(-1)).squeeze(0)
        finite = torch.isfinite(dx).all(-1, keepdim=True) & torch.isfinite(dz).all(-1, keepdim=True)
        ok = ~done & finite & (info1 == 0).unsqueeze(-1) & (info2 == 0).unsqueeze(-1)
        a_p = torch.where(ok, a_p, 0.0)
        a_d = torch.where(ok, a_d, 0.0)
        s = s + a_p * torch.where(ok, dx, 0.0)
        z = z + a_d * torch.where(ok, dz, 0.0)
        if simplex:
            y = y + a_p * torch.where(ok, dy, 0.0)
        done = done | ((mu < tol) & (rd.abs().amax(-1, keepdim=True) < 1e-9))
    x = base + s
    if merit is None:  # a quadratic: polish
        big = s > 1e-6 * (s * act).amax(-1, keepdim=True)  # degenerate s, z -> 0: take as active
        Q = oracle(x, None)[1]
        x = _polish(Q, lower, x, free=(s > z) & big & (act > 0), act=act, simplex=simplex)
    return x


def _polish(Q, lower, x, *, free, act, simplex, tol=1e-10):
    """One exact step for a quadratic f: fix every variable the interior point found at
    its bound (``s <= z``, or s below 1e-6 of the largest), solve the KKT system of the
    rest, and keep the result where it is feasible, dual feasible, no worse and not
    larger than 10x the interior point (a singular system gives none of these). Where
    the optimum is degenerate (d = 0, exactly orthogonal gradients) this turns the
    interior point's ~1e-8 into rounding error."""
    n = x.shape[-1]
    fr = free.to(x.dtype)
    fixed = torch.where(act > 0, lower, 0.0) * (1 - fr)
    M = Q * fr.unsqueeze(-1) * fr.unsqueeze(-2) + torch.diag_embed(1 - fr)
    top = fr * -_mv(Q, fixed) + fixed
    if simplex:
        A = torch.cat([torch.cat([M, fr.unsqueeze(-1)], -1),
                       torch.cat([fr.unsqueeze(-2), x.new_zeros(x.shape[:-1] + (1, 1))], -1)], -2)
        rhs = torch.cat([top, 1 - (fixed * act).sum(-1, keepdim=True)], -1)
    else:
        A, rhs = M, top
    sol, info = torch.linalg.solve_ex(A, rhs.unsqueeze(-1))
    sol = sol.squeeze(-1)
    xp = torch.where(free, sol[..., :n], fixed)
    y = -sol[..., n:] if simplex else 0.0
    z = _mv(Q, xp) - y
    fval = lambda v: (v * _mv(Q, v)).sum(-1, keepdim=True)
    ok = ((info == 0).unsqueeze(-1) & torch.isfinite(sol).all(-1, keepdim=True)
          & ((xp - lower >= -tol) | ~free).all(-1, keepdim=True)
          & ((z >= -tol) | free | (act == 0)).all(-1, keepdim=True)
          & (fval(xp) <= fval(x) + tol * tol)
          & (xp.abs().amax(-1, keepdim=True) <= 10 * x.abs().amax(-1, keepdim=True) + 1))
    return torch.where(ok, xp, x)


def _qp_oracle(Q: torch.Tensor):
    return lambda x, mu: (_mv(Q, x), Q)


def _mgda2(Gn: torch.Tensor) -> torch.Tensor:
    """Closed-form min-norm weights for K = 2 (exact line search on the segment)."""
    a, b, c = Gn[..., 0, 0], Gn[..., 1, 1], Gn[..., 0, 1]
    den = a + b - 2 * c
    w0 = torch.where(den > 0, (b - c) / torch.where(den > 0, den, 1.0), 0.5).clamp(0.0, 1.0)
    return torch.stack([w0, 1 - w0], -1)


def _min_norm(Gn: torch.Tensor, iters: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    K = Gn.shape[-1]
    if K == 1:
        return Gn.new_ones(Gn.shape[:-1])
    if K == 2 and mask is None:
        return _mgda2(Gn)
    lower = Gn.new_zeros(Gn.shape[:-1])
    return _ipm(_qp_oracle(Gn), lower, simplex=True, iters=iters, mask=mask)


@_weighting
def mgda(G: torch.Tensor, iters: int = ITERS) -> torch.Tensor:
    """MGDA: the min-norm point of the convex hull of the gradients.

    ``w = argmin_{w in simplex} w^T G w`` (Désidéri 2012; Sener & Koltun 2018), so
    ``d`` is the min-norm element of ``conv{g_k}``, non-conflicting with every g_k
    (``<d, g_k> >= |d|^2``). K = 2: the closed form ``w_0 = clamp((G11 - G01) /
    (G00 + G11 - 2 G01), 0, 1)`` (0.5 when the two gradients are equal); K >= 3: the
    interior-point solver with ``iters`` iterations (default 20). torchjd's MGDA runs
    Frank-Wolfe (at most 100 steps, stopping when the step is below 1e-3), which is
    exact for K = 2 and approximate beyond: this one reaches a norm at least as small.
    """
    return _min_norm(_normalise(G), iters)


@functools.lru_cache(maxsize=None)
def _pcgrad_orders_cached(K: int, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return tuple(tuple(torch.randperm(K, generator=gen).tolist()) for _ in range(K))


@torch.compiler.assume_constant_result
def _pcgrad_orders(K: int, seed: int) -> tuple:
    # CPU generator, data-independent: a constant for torch.compile, never a device sync.
    return _pcgrad_orders_cached(K, seed)


@_weighting
def pcgrad(G: torch.Tensor, seed: int = 0, orders=None) -> torch.Tensor:
    """PCGrad (Yu et al. 2020), on the Gram matrix, as torchjd's ``PCGradWeighting``.

    For each objective i, a coefficient row ``c_i = e_i`` (so ``g_i^PC = J^T c_i``) is
    projected in turn against every other gradient g_j, in the order ``orders[i]``:
    if ``<g_i^PC, g_j> = (G c_i)_j < 0`` then ``c_ij -= (G c_i)_j / G_jj``; the weights
    are ``w = sum_i c_i`` (the sum of the projected gradients, as torchjd; the original
    code's mean is ``w / K``). The order: ``orders[i]`` is the i-th of K draws of
    ``torch.randperm(K, generator=torch.Generator().manual_seed(seed))`` (entries equal
    to i are skipped) -- the same draws torchjd makes from the global generator after
    ``torch.manual_seed(seed)``. ``orders`` (K sequences of indices) overrides it. K
    sequential steps, each vectorised over i; no iteration budget.
    """
    Gn = _normalise(G)
    K = Gn.shape[-1]
    if orders is None:
        orders = _pcgrad_orders(K, seed)
    orders = [list(o) for o in orders]
    if len(orders) != K or any(sorted(j for j in o if j != i) != [j for j in range(K) if j != i]
                               for i, o in enumerate(orders)):
        raise ValueError(f"orders: expected K={K} permutations of range({K}) (entry i may omit i)")
    eye = torch.eye(K, dtype=Gn.dtype, device=Gn.device)
    zero = torch.zeros(K, dtype=Gn.dtype, device=Gn.device)
    C = eye.expand(Gn.shape).clone()  # row i: coefficients of g_i^PC
    diag = Gn.diagonal(dim1=-2, dim2=-1)
    steps = max(len(o) for o in orders)
    for t in range(steps):
        # P[i] = e_{j_i}: the gradient row i is projected against at step t (0 if none).
        moves = [t < len(o) and o[t] != i for i, o in enumerate(orders)]  # Python ints only
        if not any(moves):
            continue
        P = torch.stack([eye[o[t]] if m else zero for m, (i, o) in zip(moves, enumerate(orders))])
        Gj = P @ Gn  # [..., i, :] = row j_i of G
        ip = (Gj * C).sum(-1)  # <g_i^PC, g_{j_i}>
        gjj = (P * diag.unsqueeze(-2)).sum(-1)  # G_{j_i j_i}
        coef = torch.where(ip < 0, ip / torch.where(gjj > 0, gjj, 1.0), 0.0)
        C = C - coef.unsqueeze(-1) * P
    return C.sum(-2)


def _cagrad_F(Gn, b, r, w):
    return (b * w).sum(-1) + r * (w * _mv(Gn, w)).sum(-1).clamp(min=0).sqrt()


@_weighting
def cagrad(G: torch.Tensor, c: float = 0.5, iters: int = ITERS, norm_eps: float = 1e-4, rescale: int = 0) -> torch.Tensor:
    """CAGrad (Liu et al. 2021), as torchjd's ``CAGradWeighting`` (plus an optional rescale).

    On the trace-normalised G, with ``g_0 = mean_k g_k`` and ``phi = c^2 |g_0|^2``:
    ``w* = argmin_{w in simplex} <g_w, g_0> + sqrt(phi) |g_w|`` (``g_w = J^T w``), i.e.
    ``w^T G 1/K + c |g_0| sqrt(w^T G w)``; then ``w = 1/K + (sqrt(phi) / |g_w*|) w*``, so
    ``d = g_0 + c |g_0| g_w* / |g_w*|``. When ``|g_w*| < norm_eps`` (relative to the
    gradients' Frobenius norm: a Pareto-stationary point) the weights are 0, as torchjd.
    ``rescale``: 0 none (torchjd), 1 divides by ``1 + c^2`` (the official code's
    default), 2 by ``1 + c``. Solver: ``iters`` interior-point iterations (default 20)
    with a line search, ``|g_w|`` smoothed as ``sqrt(|g_w|^2 + mu)`` along the path; the
    MGDA point (another ``iters``) is a second candidate for an optimum at the kink
    ``g_w = 0``, and the one with the lower objective is kept. torchjd solves the same
    problem with cvxpy/CLARABEL on the host (to about 1e-5 relative).
    """
    if c < 0:
        raise ValueError(f"c: expected >= 0, got {c}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"rescale: expected 0, 1 or 2, got {rescale}")
    Gn = _normalise(G)
    K = Gn.shape[-1]
    u = Gn.new_full(Gn.shape[:-1], 1.0 / K)
    b = _mv(Gn, u)  # <g_k, g_0>
    r = c * (u * b).sum(-1, keepdim=True).clamp(min=0).sqrt()  # c |g_0|
    # |g_w| is smoothed as sqrt(|g_w|^2 + mu), mu the interior point's complementarity:
    # nearly quadratic at the start, the exact norm at the end; without it the iterates
    # can stall at the kink g_w = 0 (which is in the hull when G is rank-deficient).

    def oracle(w, mu):
        Gw = _mv(Gn, w)
        q = ((w * Gw).sum(-1, keepdim=True).clamp(min=0) + mu).sqrt()
        grad = b + r * Gw / q
        hess = (r / q).unsqueeze(-1) * (Gn - Gw.unsqueeze(-1) * Gw.unsqueeze(-2) / (q * q).unsqueeze(-1))
        return grad, hess

    def merit(w, mu):  # the smoothed objective, for candidate points [L, ..., K]
        return (b * w).sum(-1) + r.squeeze(-1) * ((w * _mv(Gn, w)).sum(-1).clamp(min=0) + mu.squeeze(-1)).sqrt()

    w = _ipm(oracle, torch.zeros_like(u), simplex=True, iters=iters, merit=merit)
    tip = _min_norm(Gn, iters)
    r0 = r.squeeze(-1)
    w = torch.where((_cagrad_F(Gn, b, r0, tip) <= _cagrad_F(Gn, b, r0, w)).unsqueeze(-1), tip, w)
    q = (w * _mv(Gn, w)).sum(-1, keepdim=True).clamp(min=0).sqrt()
    out = torch.where(q >= norm_eps, u + r / torch.where(q > 0, q, 1.0) * w, 0.0)
    if rescale == 1:
        out = out / (1 + c * c)
    elif rescale == 2:
        out = out / (1 + c)
    return out


def _pinv_mv(Gn: torch.Tensor, rhs: torch.Tensor, rcond: float) -> torch.Tensor:
    """``G^+ rhs`` without an eigendecomposition (torch's eigh/svd/pinv check errors on the
    host): a pivoted Cholesky ``G ~ L L^T`` run for K steps (pivot: the largest residual
    diagonal; a pivot below ``rcond`` -- a gradient within sqrt(rcond) of the span of the
    ones already taken -- ends the factor), then ``G^+ = L (L^T L)^-2 L^T`` on the kept
    columns (exact for ``L L^T``, which differs from G by at most the dropped residual)."""
    K = Gn.shape[-1]
    idx = torch.arange(K, device=Gn.device)
    R = Gn
    cols, keeps = [], []
    for _ in range(K):
        dg = R.diagonal(dim1=-2, dim2=-1)
        e = (idx == dg.argmax(-1, keepdim=True)).to(Gn.dtype)
        piv = (dg * e).sum(-1, keepdim=True)
        keep = piv > rcond
        col = torch.where(keep, _mv(R, e) / torch.where(keep, piv, 1.0).sqrt(), 0.0)
        R = R - col.unsqueeze(-1) * col.unsqueeze(-2)
        cols.append(col)
        keeps.append(keep)
    L = torch.stack(cols, -1)
    dropped = ~torch.cat(keeps, -1)
    M = L.transpose(-1, -2) @ L + torch.diag_embed(dropped.to(Gn.dtype))
    t = _mv(L.transpose(-1, -2), rhs)
    t = torch.linalg.solve_ex(M, t.unsqueeze(-1))[0]
    t = torch.linalg.solve_ex(M, t)[0].squeeze(-1)
    return _mv(L, t)


@_weighting
def imtlg(G: torch.Tensor, rcond: float = 1e-10) -> torch.Tensor:
    """IMTL-G (Liu et al. 2021), generalised as torchjd's ``IMTLGWeighting``.

    ``v = G^+ sqrt(diag G)``, ``w = v / sum(v)`` (0 when ``|sum(v)| < 1e-12``): for
    linearly independent gradients, ``d`` has equal projections on every unit gradient.
    The pseudo-inverse of the trace-normalised G comes from a rank-revealing pivoted
    Cholesky (K steps, no iteration budget; see ``_pinv_mv``): directions in which the
    gradients span less than ``rcond`` of the trace (rank deficiency, rounding) are
    dropped. torchjd calls ``torch.linalg.pinv`` (cut-off about 1e-15 of the largest
    eigenvalue), so the two differ only when gradients are parallel to within about
    1e-5, where IMTL-G's weights are ill-conditioned anyway.
    """
    Gn = _normalise(G)
    dvec = Gn.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    v = _pinv_mv(Gn, dvec, rcond)
    tot = v.sum(-1, keepdim=True)
    return torch.where(tot.abs() >= 1e-12, v / torch.where(tot == 0, 1.0, tot), 0.0)


@_weighting
def upgrad(G: torch.Tensor, iters: int = ITERS, reg_eps: float = 1e-4) -> torch.Tensor:
    """UPGrad (Quinton & Rey 2024), as torchjd's ``UPGradWeighting`` with its defaults.

    Each gradient, weighted by 1/K, is projected onto the dual cone of the gradients
    (``{d : <d, g_k> >= 0 for all k}``); the result is the sum of the projections. In
    weight space (torchjd's Proposition 1): ``v_i = argmin_{v >= e_i / K} v^T G' v`` and
    ``w = sum_i v_i``, with ``G' = G / tr(G) + reg_eps I`` as torchjd's
    ``QuadprogProjector`` (``normalize`` then ``regularize``, reg_eps = 1e-4). ``reg_eps``
    shifts ``d`` by up to about 1e-3 of ``|J|_F`` on rank-deficient G and lets ``d``
    conflict by up to about ``reg_eps * tr(G) * max(v)``; ``reg_eps=1e-12`` gives the
    exact projection (to about 1e-8 of ``|J|_F``). A small positive value is needed: with
    ``reg_eps=0`` the projection's weights are not unique (nor bounded) for
    rank-deficient G. The K problems are solved together, ``iters`` interior-point
    iterations (default 20). torchjd zeroes G when its trace is below 1e-4 (making
    UPGrad the mean for tiny gradients); here nothing depends on the scale.
    """
    Gn = _normalise(G)
    K = Gn.shape[-1]
    eye = torch.eye(K, dtype=Gn.dtype, device=Gn.device)
    Q = (Gn + reg_eps * eye).unsqueeze(-3).expand(Gn.shape[:-2] + (K, K, K))
    lower = (eye / K).expand(Gn.shape[:-2] + (K, K))
    V = _ipm(_qp_oracle(Q), lower, simplex=False, iters=iters)
    return V.sum(-2)


MMPARETO_FLOOR = 0.001  # docs/semantics.md's 0.999 / 0.001 clamp


@_weighting
def mmpareto(G: torch.Tensor, main: int = 0, iters: int = ITERS) -> torch.Tensor:
    """MMPareto (Wei & Hu 2024) for one main objective and K-1 auxiliary ones.

    Weights sum to 1; the combine step uses ``n = K sum_k w_k g_k`` and applies
    docs/semantics.md's per-tensor magnitude rescale (not part of the weights). Definition:

    * The conflict test of docs/semantics.md against the main gradient: auxiliary j
      conflicts iff ``<g_main, g_j> <= 0``. C = the conflicting auxiliaries,
      S = {main} + C.
    * Auxiliaries not in C get ``1/K`` (equal weights, as MMPareto's 0.5 / 0.5).
    * |C| = 0: every weight is 1/K, so ``n`` is the plain sum.
    * |C| = 1 (always the case for K = 2 with a conflict): docs/semantics.md's two-objective
      weights between main and j, exactly (``AB >= AA -> w_mm = 0.999``, else
      ``AB >= BB -> 0.001``, else ``(BB - AB) / (AA + BB - 2 AB)``), times 2/K. For K = 2
      this is ``(w_mm, w_uni)`` of docs/semantics.md and ``n = 2 (w_mm a + w_uni b)``.
    * |C| >= 2: the min-norm (MGDA) weights over S, times |S|/K; the 0.999 / 0.001
      clamp generalises as: if the min-norm point is a vertex k of S (``G_kj >= G_kk``
      for every j in S, i.e. in exact arithmetic g_k = 0; main first, then the lowest
      index), k gets ``1 - 0.001 (|S| - 1)`` and the rest of S 0.001 each.

    So ``K sum_k w_k g_k = |S| n_S + sum_{j not in S} g_j`` with n_S the min-norm point
    of S: it never conflicts with the main gradient. ``iters``: interior-point
    iterations for |C| >= 2 (default 20; K = 2 never iterates).
    """
    G64 = G.to(torch.float64)
    Gn = _normalise(G64)
    K = Gn.shape[-1]
    if not -K <= main < K:
        raise ValueError(f"main: expected an objective index in [0, {K}), got {main}")
    main = main % K
    if K == 1:
        return Gn.new_ones(Gn.shape[:-1])
    dev = Gn.device
    idx = torch.arange(K, device=dev)
    is_main = idx == main
    # docs/semantics.md's test and closed form on the raw Gram entries (AA, AB_j, BB_j).
    AB = G64[..., main, :]
    AA = G64[..., main, main].unsqueeze(-1)
    BB = G64.diagonal(dim1=-2, dim2=-1)
    conflict = (AB <= 0) & ~is_main
    den = AA + BB - 2 * AB
    w_pair = torch.where(AB >= AA, 1 - MMPARETO_FLOOR,
                         torch.where(AB >= BB, MMPARETO_FLOOR, (BB - AB) / torch.where(den != 0, den, 1.0)))
    n_conf = conflict.sum(-1, keepdim=True)
    flat = Gn.new_full(Gn.shape[:-1], 1.0 / K)
    # |C| = 1: main gets 2/K w_mm of the conflicting pair, that auxiliary 2/K (1 - w_mm).
    w_mm1 = (w_pair * conflict).sum(-1, keepdim=True)
    one = torch.where(is_main, 2.0 / K * w_mm1, torch.where(conflict, 2.0 / K * (1 - w_pair), 1.0 / K))
    if K == 2:
        return torch.where(n_conf == 1, one, flat)
    # |C| >= 2: min-norm over S (vertex rule first).
    S = conflict | is_main
    size = S.sum(-1, keepdim=True).to(Gn.dtype)
    vert = (((G64 >= BB.unsqueeze(-1)) | ~S.unsqueeze(-2)).all(-1)) & S
    prio = torch.where(idx == main, -1, idx)
    first = torch.where(vert, prio, K).argmin(-1, keepdim=True)
    k_onehot = idx == first
    has_vert = vert.any(-1, keepdim=True)
    alpha_vert = torch.where(k_onehot, 1 - MMPARETO_FLOOR * (size - 1), MMPARETO_FLOOR * S.to(Gn.dtype))
    alpha = torch.where(has_vert, alpha_vert, _min_norm(Gn, iters, mask=S))
    many = torch.where(S, size / K * alpha, 1.0 / K)
    return torch.where(n_conf >= 2, many, torch.where(n_conf == 1, one, flat))


WEIGHTINGS = {
    "mgda": mgda,
    "pcgrad": pcgrad,
    "cagrad": cagrad,
    "imtlg": imtlg,
    "upgrad": upgrad,
    "mmpareto": mmpareto,
}


def pick(table: dict, name: str):
    """``table[name]``; a ``ValueError`` naming the known ones otherwise (shared by the
    exact weightings' table in ``mmfast.weightings`` and this one)."""
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown weighting {name!r}; known: {', '.join(sorted(table))}") from None


def weights(name: str, G: torch.Tensor, **kw) -> torch.Tensor:
    """``WEIGHTINGS[name](G, **kw)``; a ``ValueError`` naming the known ones otherwise."""
    return pick(WEIGHTINGS, name)(G, **kw)
