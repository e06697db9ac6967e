"""Python side of the ``mmfast::combine_`` operator: shapes for tracing, unpacking."""
from __future__ import annotations

import torch

from ._args import CombineArgs, _check_py, explain
from ._backends import _C as _FAST
from ._stats import CombineStats


def _register_fake() -> None:
    @torch.library.register_fake("mmfast::combine_")
    def _(out, grads_mm, grads_uni, groups, fusion, method, gamma, alpha, max_norm):
        _same_device(["out", "grads_mm", "grads_uni"], [out, grads_mm, grads_uni])
        g = max(groups) + 1 if len(groups) else 0
        like = dict(dtype=torch.float64, device=out[0].device)
        return (
            out[0].new_empty((g, 3), **like),
            out[0].new_empty((g,), **like),
            out[0].new_empty((g, 2), **like),
            out[0].new_empty((g,), dtype=torch.bool),
            out[0].new_empty((), **like),
            out[0].new_empty((), **like),
            out[0].new_empty((), dtype=torch.bool),
        )


def _same_device(names, lists) -> None:
    """A list that mixes devices reaches this fake kernel when one of them is ``meta``:
    word it as the contract does (the real kernels check in C++)."""
    device = lists[0][0].device if lists[0] else None
    if any(t.device != device for ts in lists for t in ts):
        _check_py(names, lists, 0, None, None)


def call_op(args: CombineArgs) -> CombineStats:
    # Eager: the direct entry (csrc/fast_calls.h), a third of torch.ops' host cost per
    # tensor; traced (torch.compile), the registered operator.
    op = _COMBINE if torch.compiler.is_compiling() else _FAST.combine_
    try:
        gram, cos, weights, conflict, total_norm, clip_coef, all_finite = op(
            args.out, args.grads_mm, args.grads_uni, args.groups, args.fusion, args.method, args.gamma, args.alpha,
            args.max_norm)
    except (TypeError, RuntimeError) as e:
        explain(["out", "grads_mm", "grads_uni"], [args.out, args.grads_mm, args.grads_uni], 1, args.groups,
                args.fusion, e)
    return CombineStats(gram, cos, weights[:, 0], weights[:, 1], conflict, total_norm, clip_coef, all_finite)


_COMBINE = torch.ops.mmfast.combine_.default


def _register_pass_fakes() -> None:
    @torch.library.register_fake("mmfast::gram_")
    def _(grads_mm, grads_uni):
        _same_device(["grads_mm", "grads_uni"], [grads_mm, grads_uni])
        return grads_mm[0].new_empty((len(grads_mm), 4), dtype=torch.float64)

    @torch.library.register_fake("mmfast::combine_pass_")
    def _(out, grads_mm, grads_uni, per_tensor, groups, gamma):
        _same_device(["out", "grads_mm", "grads_uni"], [out, grads_mm, grads_uni])
        g = max(groups) + 1 if len(groups) else 0
        like = dict(dtype=torch.float64, device=out[0].device)
        return (out[0].new_empty((g, 3), **like), out[0].new_empty((g,), **like), out[0].new_empty((g, 2), **like),
                out[0].new_empty((g,), dtype=torch.bool), out[0].new_empty((len(out),), **like))


def _register_clip_fake() -> None:
    _register_pass_fakes()  # (registered with the clip's: mmfast/__init__.py calls these)

    @torch.library.register_fake("mmfast::clip_")
    def _(grads, groups, max_norm):
        _same_device(["grads"], [grads])
        g = max(groups) + 1 if len(groups) else 0
        like = dict(dtype=torch.float64, device=grads[0].device)
        return (grads[0].new_empty((g,), **like), grads[0].new_empty((), **like), grads[0].new_empty((), **like),
                grads[0].new_empty((), dtype=torch.bool))


def _register_multi_fake() -> None:
    @torch.library.register_fake("mmfast::gram_k")
    def _(grads, K):
        T = len(grads) // K
        return grads[0].new_empty((T, K, K), dtype=torch.float64), grads[0].new_empty((), dtype=torch.bool)

    @torch.library.register_fake("mmfast::combine_k_")
    def _(out, grads, K, coefs):
        return out[0].new_empty((len(out),), dtype=torch.float64)

    @torch.library.register_fake("mmfast::weighting")
    def _(G, weighting, c, norm_eps, rescale, reg_eps, rcond, main, orders, eps):
        return G.new_empty(G.shape[:-1])

    @torch.library.register_fake("mmfast::aggregate_weights")
    def _(per_tensor, layout, num_groups, weighting, c, norm_eps, rescale, reg_eps, rcond, main, orders, eps, gamma):
        T, K = per_tensor.shape[0], per_tensor.shape[1]
        return (per_tensor.new_empty((num_groups, K, K)), per_tensor.new_empty((num_groups, K)),
                per_tensor.new_empty((T, K)))

    @torch.library.register_fake("mmfast::aggregate_k_")
    def _(out, grads, K, per_tensor, layout, num_groups, weighting, c, norm_eps, rescale, reg_eps, rcond, main,
          orders, eps, gamma):
        f64 = dict(dtype=torch.float64)
        return (out[0].new_empty((num_groups, K, K), **f64), out[0].new_empty((num_groups, K), **f64),
                out[0].new_empty((), **f64), out[0].new_empty((), dtype=torch.bool))
