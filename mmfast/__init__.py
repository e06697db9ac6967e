"""mmfast: fused gradient combination for multimodal training (MMPareto, DGL).

The public API is small: ``combine_`` (the in-place op), ``CombineStats`` (what it
returns) and ``backends()`` (what this process can run).
"""
from ._backends import BackendInfo, backends
from ._clip import ClipStats, clip_grad_norm_
from ._combine import combine_
from ._multi import AggregateStats, aggregate_
from ._stats import CombineStats, DGLStats
from .dgl import DGL
from .mmpareto import MMPareto
from .multi_objective import MultiObjective

from ._version import __version__
__all__ = ["MMPareto", "DGL", "MultiObjective", "combine_", "aggregate_", "AggregateStats", "CombineStats", "DGLStats", "clip_grad_norm_", "ClipStats", "BackendInfo", "backends", "__version__"]


def _register() -> None:
    from ._backends import _C

    if _C is not None:
        from ._ops import _register_clip_fake, _register_fake, _register_multi_fake

        _register_fake()
        _register_clip_fake()
        _register_multi_fake()


_register()
