"""The training helpers' parameter groups, looked up from the user's modules at every
``backward``: a parameter that starts or stops requiring grad, one replaced by
``load_state_dict(assign=True)`` or ``model.to(...)``, joins or leaves its group at the
next step. Nothing here keeps a parameter from one step to the next."""
from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
from torch import nn


class StepGroups(NamedTuple):
    """One step's members: ``members[g]`` the parameters of group g that require grad.

    Under FSDP2 (``fully_shard``) a member is the *sharded* parameter (a DTensor, where
    FSDP puts the reduced gradient), while the autograd graph holds the unsharded one:
    ``group_of``, ``labels`` and ``leaf`` know both, so a graph leaf maps to its member.
    """

    names: tuple  # group names, in the order given
    members: tuple  # per group, a tuple of parameters
    labels: dict  # id(param or its unsharded alias) -> "group.sub.name", for messages
    group_of: dict  # id(param or its unsharded alias) -> group index
    extra: dict  # name -> tuple of parameters (DGL's fusion module)
    leaf: dict  # id(unsharded parameter) -> its sharded parameter (FSDP2; empty without)

    @property
    def params(self) -> list:
        return [p for ps in self.members for p in ps]

    @property
    def group_ids(self) -> list:
        return [g for g, ps in enumerate(self.members) for _ in ps]


def _items(name: str, spec) -> list:
    """``[(label, param)]`` of a group spec (frozen parameters included), looked up now."""
    if isinstance(spec, nn.Module):
        return [(f"{name}.{n}", p) for n, p in spec.named_parameters()]
    out = []
    for i, x in enumerate(spec):
        if isinstance(x, nn.Module):
            out += [(f"{name}[{i}].{n}", p) for n, p in x.named_parameters()]
        else:
            out.append((f"{name}[{i}]", x))
    return out


def _check_spec(name, spec):
    """A module, or a list of modules and tensors (materialised once: a generator is read
    now; the modules in it are still looked up at every step)."""
    if not isinstance(name, str):
        raise TypeError(f"groups: expected str names, got {name!r}")
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, torch.Tensor):
        spec = [spec]
    elif isinstance(spec, Iterable) and not isinstance(spec, (str, bytes, dict)):
        spec = list(spec)
    else:
        raise TypeError(f"groups[{name!r}]: expected an nn.Module or an iterable of parameters, got {type(spec).__name__}")
    for i, p in enumerate(spec):
        if not isinstance(p, (torch.Tensor, nn.Module)):
            raise TypeError(f"groups[{name!r}][{i}]: expected a parameter or a module, got {type(p).__name__}")
    return tuple(spec)


class Groups:
    """``{name: module, or list of modules and parameters}`` (plus named extra sets, e.g.
    DGL's fusion module).

    Modules are looked up at every ``resolve()``; a tensor in a list is fixed, so pass
    modules when parameters may be replaced (``load_state_dict(assign=True)``).
    """

    def __init__(self, groups: dict, extra: dict | None = None):
        if not isinstance(groups, dict) or not groups:
            raise TypeError("groups: expected a non-empty dict {name: module or parameters}")
        extra = dict(extra or {})
        for name in extra:
            if name in groups:
                raise ValueError(f"groups: the name {name!r} is taken by the {name} argument")
        self.names = tuple(groups)
        self.extra_names = tuple(extra)
        self.specs = {name: _check_spec(name, spec) for name, spec in {**groups, **extra}.items()}
        for name, spec in self.specs.items():
            if not _items(name, spec):
                raise ValueError(f"groups[{name!r}]: has no parameters")
        self._last = None
        self.resolve()  # parameters in two groups, non-leaf tensors: an error now

    def resolve(self) -> StepGroups:
        """This step's members; labelled and checked again only when they changed."""
        fsdp = fsdp_params(self.specs.values())
        found = {}
        for name, spec in self.specs.items():
            mods = [spec] if isinstance(spec, nn.Module) else spec
            ps = []
            for x in mods:
                ps.extend(x.parameters() if isinstance(x, nn.Module) else (x,))
            found[name] = [fsdp[id(p)].sharded_param if id(p) in fsdp else p for p in ps]
        key = tuple((id(p), p.requires_grad) for ps in found.values() for p in ps) + tuple(fsdp)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        sets = {}
        for name, spec in self.specs.items():
            seen, members = set(), []
            for label, p in _items(name, spec):
                p = fsdp[id(p)].sharded_param if id(p) in fsdp else p
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    members.append((label, p))
            sets[name] = members
        owner = {}
        for name, members in sets.items():
            for label, p in members:
                if not p.is_leaf:
                    raise ValueError(f"{label}: expected a leaf parameter, got a non-leaf tensor")
                if id(p) in owner:
                    raise ValueError(f"{label}: this parameter is in two groups, {owner[id(p)]!r} and {name!r}")
                owner[id(p)] = name
        leaf = {}
        for fp in {id(fp): fp for fp in fsdp.values()}.values():
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None and unsharded is not fp.sharded_param:
                leaf[id(unsharded)] = fp.sharded_param
        labels = {id(p): label for ms in sets.values() for label, p in ms}
        group_of = {id(p): g for g, n in enumerate(self.names) for _, p in sets[n]}
        for k, v in leaf.items():
            if id(v) in group_of:
                labels[k] = labels[id(v)]
                group_of[k] = group_of[id(v)]
        lay = StepGroups(
            names=self.names,
            members=tuple(tuple(p for _, p in sets[n]) for n in self.names),
            labels=labels,
            group_of=group_of,
            extra={n: tuple(p for _, p in sets[n]) for n in self.extra_names},
            leaf=leaf,
        )
        self._last = (key, lay, found, fsdp)  # (keeps the keyed objects alive: their ids stay unique)
        return lay

    def __getstate__(self):
        return {**self.__dict__, "_last": None}  # ids are not meaningful in another process


def fsdp_params(specs) -> dict:
    """``{id(sharded or unsharded parameter): FSDPParam}`` for every parameter of the FSDP2
    tree that the modules of the given specs belong to (``fully_shard`` on each group
    module, as FSDP2 recommends; the root's state lists the whole tree after the first
    forward)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return {}
    states = {}
    for spec in specs:
        for top in ([spec] if isinstance(spec, nn.Module) else [x for x in spec if isinstance(x, nn.Module)]):
            for m in top.modules():
                if isinstance(m, FSDPModule):
                    st = m._get_fsdp_state()  # FSDP2's private state (torch >= 2.6)
                    states[id(st)] = st
                    for other in getattr(getattr(st, "_state_ctx", None), "all_states", ()):
                        states[id(other)] = other
    out = {}
    for st in states.values():
        group = st._fsdp_param_group
        for fp in (group.fsdp_params if group is not None else ()):
            out[id(fp.sharded_param)] = fp
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None:
                out[id(unsharded)] = fp
    return out
