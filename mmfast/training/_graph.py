"""Which leaf tensors a loss reaches, read off its autograd graph (every step: the
graph is the step's own, so a branch taken only sometimes is seen when it is taken)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Reach(NamedTuple):
    leaves: dict  # {id(leaf): leaf}, in the order the walk met them
    opaque: bool  # the walk went through a compiled graph: ``leaves`` may over-approximate


def _is_opaque(fn) -> bool:
    # torch.compile's backward is one node for the whole compiled region: it links every
    # output to every input, whatever the real dependencies are.
    return type(fn).__name__.startswith("CompiledFunction")


def _is_passthrough(fn) -> bool:
    # DDP (find_unused_parameters=True) runs every output through one _DDPSink node whose
    # output i is its input i: follow only the input the walk arrived on.
    return type(fn).__name__ == "_DDPSinkBackward"


def reach(loss: torch.Tensor) -> Reach:
    """The leaves whose gradient ``loss.backward()`` would accumulate."""
    leaves, seen, stack, opaque = {}, set(), [(loss.grad_fn, 0)], False
    while stack:
        fn, nr = stack.pop()
        passthrough = _is_passthrough(fn)
        key = (fn, nr) if passthrough else fn
        if key in seen:
            continue
        seen.add(key)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None:
            leaves[id(var)] = var
        elif not opaque and _is_opaque(fn):
            opaque = True
        nxt = fn.next_functions
        if passthrough and nr < len(nxt):
            nxt = (nxt[nr],)
        stack.extend(edge for edge in nxt if edge[0] is not None)
    return Reach(leaves, opaque)
