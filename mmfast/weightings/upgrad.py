"""UPGrad (Quinton & Rey 2024), as torchjd's ``UPGradWeighting`` with its defaults."""
from __future__ import annotations

import torch

from ._solve import solve


def upgrad(G: torch.Tensor, *, reg_eps: float = 1e-4, eps: float | None = None) -> torch.Tensor:
    """Each gradient, weighted by 1/K, is projected onto the dual cone of the gradients
    (``{d : <d, g_k> >= 0 for all k}``); the result is the sum of the projections. In
    weight space (torchjd's Proposition 1): ``v_i = argmin_{v >= e_i / K} v^T G' v`` and
    ``w = sum_i v_i``, with ``G' = G / tr(G) + reg_eps I`` (torchjd's ``normalize`` then
    ``regularize``). ``reg_eps`` shifts ``d`` by up to about 1e-3 of ``|J|_F`` on
    rank-deficient G; ``reg_eps=1e-12`` gives the exact projection.

    Exact: each of the K bounded QPs by Lawson-Hanson's active set (the free set solved
    by Cholesky), as torchjd's quadprog (Goldfarb-Idnani) is exact. torchjd zeroes G when
    its trace is below 1e-4 (making UPGrad the mean for tiny gradients); here nothing
    depends on the scale.
    """
    return solve("upgrad", G, eps, reg_eps=reg_eps)
