"""Parameter groups and their flat gradient buffers, shared by the training helpers."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def named_params(name: str, spec) -> list:
    """``[(label, param)]`` of a group given as a module or an iterable of parameters."""
    if isinstance(spec, nn.Module):
        items = [(f"{name}.{n}", p) for n, p in spec.named_parameters()]
    elif isinstance(spec, torch.Tensor):
        items = [(f"{name}[0]", spec)]
    elif isinstance(spec, Iterable):
        items = []
        for i, p in enumerate(spec):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"groups[{name!r}][{i}]: expected a parameter, got {type(p).__name__}")
            items.append((f"{name}[{i}]", p))
    else:
        raise TypeError(f"groups[{name!r}]: expected an nn.Module or an iterable of parameters, got {type(spec).__name__}")
    for label, p in items:
        if p.requires_grad and not p.is_leaf:
            raise ValueError(f"{label}: expected a leaf parameter, got a non-leaf tensor")
    return [(label, p) for label, p in items if p.requires_grad]


def parse_groups(groups: dict, extra: dict | None = None) -> tuple:
    """Checks the groups (and named extra parameter sets) are non-empty and disjoint.

    Returns ``(names, {name: [(label, param)]})``.
    """
    if not isinstance(groups, dict) or not groups:
        raise TypeError("groups: expected a non-empty dict {name: module or parameters}")
    sets = {}
    owner = {}
    for name, spec in list(groups.items()) + list((extra or {}).items()):
        if not isinstance(name, str):
            raise TypeError(f"groups: expected str names, got {name!r}")
        items = named_params(name, spec)
        if not items:
            raise ValueError(f"groups[{name!r}]: has no parameter that requires grad")
        for label, p in items:
            if id(p) in owner and owner[id(p)][0] != name:
                raise ValueError(f"{label}: this parameter is in two groups, {owner[id(p)][0]!r} and {name!r}")
            owner[id(p)] = (name, label)
        # A module may list a shared parameter twice: keep it once.
        seen, unique = set(), []
        for label, p in items:
            if id(p) not in seen:
                seen.add(id(p))
                unique.append((label, p))
        sets[name] = unique
    return list(groups), sets


class FlatGrads:
    """``k`` flat buffers for one parameter group; ``.grad`` set as views into one of them.

    Allocated on first use and again if the parameters move (``model.to(...)``).
    """

    def __init__(self, name: str, params: list, k: int):
        self.name, self.params, self.k = name, params, k
        self.buffers, self.views = [], []
        self._key = None

    def _layout(self):
        p0 = self.params[0]
        for p in self.params:
            if p.dtype != p0.dtype or p.device != p0.device:
                raise ValueError(
                    f"group {self.name!r}: all parameters must share dtype and device for a flat buffer; "
                    f"found {p0.dtype} on {p0.device} and {p.dtype} on {p.device}"
                )
        return (p0.dtype, p0.device, tuple(p.shape for p in self.params))

    def ensure(self) -> None:
        key = self._layout()
        if key == self._key:
            return
        dtype, device, shapes = key
        sizes = [p.numel() for p in self.params]
        total = sum(sizes)
        self.buffers = [torch.zeros(total, dtype=dtype, device=device) for _ in range(self.k)]
        self.views = [list(torch.split(buf, sizes)) for buf in self.buffers]
        self.views = [[v.view(s) for v, s in zip(vs, shapes)] for vs in self.views]
        self._key = key

    def attach(self, j: int, zero: bool = False) -> None:
        """Points every parameter's ``.grad`` at buffer ``j`` (zeroed first if asked)."""
        if zero:
            self.buffers[j].zero_()
        for p, v in zip(self.params, self.views[j]):
            p.grad = v
