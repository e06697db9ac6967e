"""CAGrad (Liu et al. 2021), as torchjd's ``CAGradWeighting`` (plus an optional rescale)."""
from __future__ import annotations

import torch

from ._solve import solve


def cagrad(G: torch.Tensor, *, c: float = 0.5, norm_eps: float = 1e-4, rescale: int = 0,
           eps: float | None = None) -> torch.Tensor:
    """On the trace-normalised G, with ``g_0 = mean_k g_k`` and ``r = c |g_0|``:
    ``w* = argmin_{w in simplex} <g_w, g_0> + r |g_w|`` (``g_w = J^T w``), then
    ``w = 1/K + (r / |g_w*|) w*``, so ``d = g_0 + c |g_0| g_w* / |g_w*|``. When
    ``|g_w*| < norm_eps`` (relative to the gradients' Frobenius norm: a Pareto-stationary
    point) the weights are 0, as torchjd's. ``rescale``: 0 none (torchjd), 1 divides by
    ``1 + c^2`` (the official code's default), 2 by ``1 + c``.

    Exact: for t > 0 the QP ``min |g_w|^2 + 2 t <g_w, g_0>`` over the simplex has the
    same KKT conditions as the problem above exactly when ``|g_w| = r t``; on one active
    set its solution is linear in t, so that equation is a quadratic solved in closed
    form, the active set found by a bisection on t with an exact (Wolfe) QP solve at each
    point (at most 96 of them; a handful in practice). Ties: where the minimum is also
    attained at ``g_w = 0`` (Pareto-stationary gradients, ``c >= 1``) that point is the
    answer (weights 0); ``c = 0``: the min-norm point of the face minimising
    ``<g_w, g_0>``. torchjd solves the same problem with cvxpy/CLARABEL on the host (to
    about 1e-5 relative).
    """
    return solve("cagrad", G, eps, c=c, norm_eps=norm_eps, rescale=rescale)
