"""Gramian weightings for K objectives: ``G [..., K, K] -> w [..., K]``.

Each function maps the Gram matrix ``G = J J^T`` of K gradients (``J`` is ``K x N``,
never formed) to weights ``w`` such that the aggregated direction is
``d = J^T w = sum_k w_k g_k``. One module per weighting; all share this contract:

* **Exact, one op.** Each call is one ``mmfast::weighting`` operator (CPU, CUDA, and
  their shape function for meta tensors and ``torch.compile``) that solves every
  group's K x K problem exactly (K <= 32; csrc/solvers.h): active-set methods whose
  subproblems are solved in closed form, so the result is the optimum to rounding,
  deterministic, with a fixed bound on the work and no host synchronisation (the
  weights stay on G's device). Where no kernel exists for G's device (no C++ extension,
  or a CUDA tensor in a CPU-only build) or K > 32, the pure-PyTorch ``reference``
  (an interior point, approximate) answers instead.
* **Batched.** Any leading dims: ``[K, K] -> [K]``, ``[G, K, K] -> [G, K]``, ...
* **Scale.** ``G`` is symmetrised and divided by its trace (left as is when the trace is
  <= 0) first, so the weights do not depend on the gradients' scale (1e-15 .. 1e15
  tested) and ``d`` is linear in it.
* **Precision.** fp64 inside; the weights come back in ``G``'s dtype. Rank decisions
  (is a gradient in the span of others, is an eigenvalue zero) use a cutoff of about K
  rounding units of ``G``'s dtype (``eps``, overridable) relative to the largest
  diagonal entry or eigenvalue: a float32 Gram matrix's rounding noise is not taken as
  a direction of the data.
* **Not differentiated through.** As torchjd's, the weightings are constants for
  autograd (``G`` is detached): differentiate through ``d = J^T w`` only.
* **Non-finite input.** A group whose Gram matrix has a NaN or an infinity gets NaN
  weights; finite input never gives NaN.

Definitions follow torchjd (``torchjd.aggregation``, version 0.18) where it has the
method; where they differ it is said in the function.
"""
from __future__ import annotations

import torch

from ._solve import KEYWORDS, pcgrad_orders as _pcgrad_orders
# What the op layer (mmfast.ops, aggregate_) needs: argument packing for the solver ops, the
# kernel registry, the rounding unit the rank cutoffs use, the largest K of the kernels.
from ._solve import MAX_K, op_args, op_has_kernel, rounding_unit
from .cagrad import cagrad
from .imtlg import imtlg
from .mgda import mgda
from .mmpareto import MMPARETO_FLOOR, mmpareto
from .pcgrad import pcgrad
from .upgrad import upgrad
from .reference import pick

__all__ = ["mgda", "pcgrad", "cagrad", "imtlg", "upgrad", "mmpareto", "WEIGHTINGS", "weights"]

WEIGHTINGS = {
    "mgda": mgda,
    "pcgrad": pcgrad,
    "cagrad": cagrad,
    "imtlg": imtlg,
    "upgrad": upgrad,
    "mmpareto": mmpareto,
}


def weights(name: str, G: torch.Tensor, **kw) -> torch.Tensor:
    """``WEIGHTINGS[name](G, **kw)``; a ``ValueError`` naming the known ones otherwise."""
    return pick(WEIGHTINGS, name)(G, **kw)
