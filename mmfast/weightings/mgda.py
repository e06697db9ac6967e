"""MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of the gradients' hull."""
from __future__ import annotations

import torch

from ._solve import solve


def mgda(G: torch.Tensor, *, eps: float | None = None) -> torch.Tensor:
    """``w = argmin_{w in simplex} w^T G w``: ``d = J^T w`` is the min-norm element of
    ``conv{g_k}``, non-conflicting with every gradient (``<d, g_k> >= |d|^2``).

    Exact: Wolfe's min-norm-point algorithm (an active-set method; each corral solved
    by Cholesky), so ``d`` is the optimum to rounding. torchjd's MGDA runs Frank-Wolfe
    (at most 100 steps, stopping when the step is below 1e-3): the same point for K = 2,
    an approximation of it beyond. Where the optimal weights are not unique (duplicated
    or affinely dependent gradients) the answer is the one on the smallest support Wolfe
    reaches from the vertex of least norm (lowest index in a tie); all gradients zero:
    ``e_k`` for the first k. ``eps``: the rounding unit behind the rank test (default:
    ``G``'s dtype's).
    """
    return solve("mgda", G, eps)
