"""PCGrad (Yu et al. 2020) on the Gram matrix, as torchjd's ``PCGradWeighting``."""
from __future__ import annotations

import torch

from ._solve import solve


def pcgrad(G: torch.Tensor, *, seed: int = 0, orders=None, eps: float | None = None) -> torch.Tensor:
    """For each objective i, a coefficient row ``c_i = e_i`` (so ``g_i^PC = J^T c_i``) is
    projected in turn against every other gradient g_j, in the order ``orders[i]``: if
    ``<g_i^PC, g_j> = (G c_i)_j < 0`` then ``c_ij -= (G c_i)_j / G_jj``; the weights are
    ``w = sum_i c_i`` (torchjd's sum; the original code's mean is ``w / K``).

    The order: ``orders[i]`` is the i-th of K draws of ``torch.randperm(K)`` from a CPU
    generator seeded with ``seed`` (entries equal to i are skipped): the draws torchjd
    makes from the global generator after ``torch.manual_seed(seed)``. ``orders`` (K
    sequences of indices) overrides it. Closed form (K^2 steps), exact to rounding.
    """
    return solve("pcgrad", G, eps, seed=seed, orders=orders)
