"""MMPareto (Wei & Hu 2024) for one main objective and K-1 auxiliary ones."""
from __future__ import annotations

import torch

from ._solve import solve

MMPARETO_FLOOR = 0.001  # docs/semantics.md's 0.999 / 0.001 clamp


def mmpareto(G: torch.Tensor, *, main: int = 0, eps: float | None = None) -> torch.Tensor:
    """Weights sum to 1; ``aggregate_`` uses ``n = K sum_k w_k g_k`` and applies
    docs/semantics.md's per-tensor magnitude rescale (not part of the weights). Definition:

    * The conflict test of docs/semantics.md against the main gradient: auxiliary j
      conflicts iff ``<g_main, g_j> <= 0``. C = the conflicting auxiliaries,
      S = {main} + C.
    * Auxiliaries not in C get ``1/K`` (equal weights, as MMPareto's 0.5 / 0.5).
    * |C| = 0: every weight is 1/K, so ``n`` is the plain sum.
    * |C| = 1 (always the case for K = 2 with a conflict): docs/semantics.md's two-objective
      weights between main and j, exactly (``AB >= AA -> w_mm = 0.999``, else
      ``AB >= BB -> 0.001``, else ``(BB - AB) / (AA + BB - 2 AB)``, on G's own entries),
      times 2/K. For K = 2 this is ``(w_mm, w_uni)`` of docs/semantics.md.
    * |C| >= 2: the min-norm (MGDA) weights over S, times |S|/K; the 0.999 / 0.001
      clamp generalises as: if the min-norm point is a vertex k of S (``G_kj >= G_kk``
      for every j in S; main first, then the lowest index), k gets
      ``1 - 0.001 (|S| - 1)`` and the rest of S 0.001 each.

    So ``K sum_k w_k g_k = |S| n_S + sum_{j not in S} g_j`` with n_S the min-norm point
    of S: it never conflicts with the main gradient.
    """
    return solve("mmpareto", G, eps, main=main)
