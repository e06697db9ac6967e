"""mmfast: fused gradient combination for multimodal training (MMPareto, DGL).

The public API is small: ``combine_`` (the in-place op), ``CombineStats`` (what it
returns) and ``backends()`` (what this process can run).
"""
from .ops import (AggregateStats, BackendInfo, ClipStats, CombineStats, DGLStats, aggregate_, backends,
                  clip_grad_norm_, combine_)
from .training import DGL, MMPareto, MultiObjective
from . import weightings  # noqa: F401  (public: mmfast.weightings; after .ops, which it may use)

from ._version import __version__
__all__ = ["MMPareto", "DGL", "MultiObjective", "combine_", "aggregate_", "AggregateStats", "CombineStats", "DGLStats", "clip_grad_norm_", "ClipStats", "BackendInfo", "backends", "__version__"]
