"""IMTL-G (Liu et al. 2021), generalised as torchjd's ``IMTLGWeighting``."""
from __future__ import annotations

import torch

from ._solve import solve


def imtlg(G: torch.Tensor, *, rcond: float | None = None, eps: float | None = None) -> torch.Tensor:
    """``v = G^+ sqrt(diag G)``, ``w = v / sum(v)`` (0 when ``|sum(v)| < 1e-12`` on the
    trace-normalised G): for linearly independent gradients, ``d`` has equal projections
    on every unit gradient.

    ``G^+`` from a Jacobi eigendecomposition (exact to rounding), dropping eigenvalues
    ``|lambda| <= rcond * max |lambda|`` as ``torch.linalg.pinv`` does; the default
    ``rcond = K * eps`` with ``eps`` the rounding unit of ``G``'s dtype is pinv's
    default too, so float32 Gram matrices of rank-deficient Jacobians lose their
    rounding-noise directions (a fixed 1e-10 kept them, and answered with noise).
    """
    return solve("imtlg", G, eps, rcond=rcond)
