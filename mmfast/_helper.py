"""What the MMPareto and DGL training helpers share: groups, loss checks, usage hooks."""
from __future__ import annotations

import torch

from ._graph import reachable_leaves
from ._groups import FlatGrads, parse_groups


class GroupHelper:
    def __init__(self, groups: dict, n_buffers: int, extra: dict | None = None, backend: str | None = None):
        self.names, sets = parse_groups(groups, extra)
        self.extra = {k: [p for _, p in sets[k]] for k in (extra or {})}
        self.labels = {id(p): label for items in sets.values() for label, p in items}
        self.flat = [FlatGrads(n, [p for _, p in sets[n]], n_buffers) for n in self.names]
        self.params = [p for f in self.flat for p in f.params]
        self.group_ids = [g for g, f in enumerate(self.flat) for _ in f.params]
        self.group_of = {id(p): g for g, f in enumerate(self.flat) for p in f.params}
        self.backend = backend
        # Which group parameters received a gradient this step: an unused one ends
        # with .grad None, as after a plain backward.
        self._touched = set()
        self._hooks = [p.register_post_accumulate_grad_hook(self._touch) for p in self.params]

    def _touch(self, p) -> None:
        self._touched.add(id(p))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def check_losses(self, loss_mm, losses) -> list:
        """The unimodal losses in group order, after checking names and shapes."""
        _check_scalar("loss_mm", loss_mm)
        if not isinstance(losses, dict):
            raise TypeError(f"losses: expected a dict {{group name: unimodal loss}}, got {type(losses).__name__}")
        for name in losses:
            if name not in self.names:
                raise ValueError(f"losses: unknown group {name!r} (groups: {', '.join(map(repr, self.names))})")
        for name in self.names:
            if name not in losses:
                raise ValueError(f"losses: missing the unimodal loss of group {name!r}")
            _check_scalar(f"losses[{name!r}]", losses[name])
        return [losses[n] for n in self.names]

    def begin(self) -> None:
        for f in self.flat:
            f.ensure()
        self._touched = set()

    def finish(self) -> None:
        for p in self.params:
            if id(p) not in self._touched:
                p.grad = None

    def outside_leaves(self, losses: list, exclude=()) -> list:
        """Leaves the losses reach that are in no group (nor in ``exclude``), in a fixed order."""
        skip = set(self.group_of) | {id(p) for p in exclude}
        found = {}
        for loss in losses:
            for pid, t in reachable_leaves(loss).items():
                if pid not in skip:
                    found[pid] = t
        return list(found.values())

    def check_disjoint(self, leaves_by_loss: list) -> None:
        """Raises if a unimodal loss reaches another group's parameters."""
        for m, leaves in enumerate(leaves_by_loss):
            for pid in leaves:
                g = self.group_of.get(pid)
                if g is not None and g != m:
                    raise ValueError(
                        f"the unimodal loss of group {self.names[m]!r} reaches group {self.names[g]!r} "
                        f"(parameter {self.labels[pid]}): one backward of the summed unimodal losses would mix "
                        f"it into {self.names[g]!r}'s unimodal gradient. Detach the features that cross, or pass "
                        f"per_loss_backward=True (one backward per unimodal loss)."
                    )


def _check_scalar(name: str, loss) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{name}: expected a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name}: expected a scalar loss, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(f"{name}: does not require grad (was it computed under no_grad, or detached?)")
