"""The op layer: the three in-place ops (``combine_``, ``clip_grad_norm_``, ``aggregate_``)
with their argument checks, statistics, backend discovery and dispatch, and their
torch.library registration."""
# Order matters: ._device_math imports ..pytorch.reference, which imports OUTSIDE,
# CombineArgs and CombineStats from this package while it is still being initialised,
# so ._args and ._stats come first.
from ._args import OUTSIDE, CombineArgs
from ._stats import CombineStats, DGLStats
from ._backends import _C as extension
from ._backends import _CUDA_BUILT as CUDA_BUILT
from ._backends import BACKENDS, BackendInfo, backends, select_backend
from ._device_math import group_layout, mmpareto_coefficients
from ._combine import combine_, combine_checked_
from ._clip import ClipStats, clip_grad_norm_
from ._multi import AggregateStats, aggregate_
from ._multi import _gram_k as gram_k
from ._multi import _weigh_and_combine as weigh_and_combine

# The public ops and what they return (re-exported by mmfast). The other names above are
# internals the other subpackages share (training, pytorch, kernels), under plain names:
# OUTSIDE (the group id of a tensor outside every group), CombineArgs (combine_'s checked
# arguments), extension (the loaded mmfast._C, or None), CUDA_BUILT (whether it has its
# CUDA kernels), BACKENDS (every backend name), select_backend, group_layout and
# mmpareto_coefficients (the device-side per-group maths), gram_k and weigh_and_combine
# (aggregate_'s two steps, run apart on FSDP2's local shards).
__all__ = ["combine_", "CombineStats", "DGLStats", "clip_grad_norm_", "ClipStats", "aggregate_", "AggregateStats",
           "BackendInfo", "backends"]


def _register() -> None:
    if extension is not None:
        from ._ops import _register_clip_fake, _register_fake, _register_multi_fake

        _register_fake()
        _register_clip_fake()
        _register_multi_fake()


_register()
