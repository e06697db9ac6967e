"""Which leaf tensors a loss reaches, read off its autograd graph."""
from __future__ import annotations

import torch


def reachable_leaves(loss: torch.Tensor) -> dict:
    """``{id(leaf): leaf}`` for every leaf whose gradient ``loss.backward()`` would accumulate."""
    leaves, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None:
            leaves[id(var)] = var
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return leaves
