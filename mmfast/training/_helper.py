"""What the training helpers share: their groups, the per-step graph reading, the
backward passes that collect one gradient list per objective, accumulation across
micro-batches, and the step-level synchronisation.

The rule every helper follows: a ``backward`` behaves like ``loss.backward()`` in the
same loop. Group parameters' ``.grad`` is taken out before each pass, so autograd
hands its gradient tensors over (no zero-fill, no add), and the update is added to
what ``.grad`` held before (accumulation) or becomes ``.grad`` (after ``zero_grad``).
Parameters outside the groups accumulate as after a plain backward.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings

import torch

from ..ops import BACKENDS, backends
from ._dist import Averaging, GradSync
from ._graph import Reach, reach
from ._groups import Groups, StepGroups
from ._sharded import is_sharded

_NOTHING = Reach({}, False)


def check_backend(backend):
    if backend is None:
        return None
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))} or None, got {backend!r}")
    info = backends()[backend]
    if not info.available:
        raise RuntimeError(f"backend={backend!r} is not available: {info.reason}")
    return backend


def check_number(name: str, value, *, low: float, strict: bool, none: bool = False):
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or float(value) < low or (strict and float(value) == low):
        bound = f"{'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name}: expected a finite number {bound}{' or None' if none else ''}, got {value!r}")
    return float(value)


def check_scalar(name: str, loss, *, need_grad: bool = True) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{name}: expected a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name}: expected a scalar loss, got shape {tuple(loss.shape)}")
    if need_grad and not loss.requires_grad:
        raise ValueError(f"{name}: does not require grad (was it computed under no_grad, or detached?)")


def dense_1d(t: torch.Tensor):
    """A 1-D view of a dense tensor in memory order (contiguous or channels_last), else None.

    Elementwise maths with per-tensor sums does not care about the order, as long as
    every operand is viewed the same way (autograd gives a gradient the layout of its
    parameter, so ``a``, ``b`` and ``.grad`` of one parameter agree).
    """
    if t.is_contiguous():
        return t.view(-1)
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if t.dim() == (4 if fmt is torch.channels_last else 5) and t.is_contiguous(memory_format=fmt):
            return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return None


class GroupHelper:
    """Base of ``MMPareto``, ``DGL`` and ``MultiObjective``."""

    owner = "mmfast"

    def __init__(self, groups: dict, *, extra: dict | None = None, backend=None, process_group=None, ddp=None):
        self.groups = Groups(groups, extra)
        self.names = self.groups.names
        self.backend = check_backend(backend)
        self.sync = GradSync(process_group, ddp, owner=self.owner)
        self._in_no_sync = False
        self._window = {}  # leaves the losses reached since the last step-level sync
        self._acc = None  # global-batch accumulation (combine=False), see accumulate
        self._warned_opaque = False
        self._active = None  # (what each hooked parameter feeds, Averaging, acc) during run_passes
        self._hooks = {}  # id(param) -> (hook handle, param)

    # ----------------------------------------------------------------- user API

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-batches before the last one: ``backward`` accumulates into ``.grad`` but
        defers the step-level work (the all-reduce of the gradients outside the groups;
        DGL's clip) to the first ``backward`` outside the block, as
        ``DistributedDataParallel.no_sync`` does."""
        old, self._in_no_sync = self._in_no_sync, True
        try:
            yield
        finally:
            self._in_no_sync = old

    def __getstate__(self):
        if self.sync.active:
            raise TypeError(f"{self.owner}: a helper bound to a process group cannot be copied or pickled; "
                            f"build one in each process")
        return dict(self.__dict__)

    # ------------------------------------------------------------- per step

    def check_losses(self, loss_mm, losses) -> list:
        """The unimodal losses in group order. A unimodal loss that does not require grad
        (a constant: the modality is missing from the batch) is allowed: ``b = 0``."""
        check_scalar("loss_mm", loss_mm)
        if not isinstance(losses, dict):
            raise TypeError(f"losses: expected a dict {{group name: unimodal loss}}, got {type(losses).__name__}")
        for name in losses:
            if name not in self.names:
                raise ValueError(f"losses: unknown group {name!r} (groups: {', '.join(map(repr, self.names))})")
        for name in self.names:
            if name not in losses:
                raise ValueError(f"losses: missing the unimodal loss of group {name!r}")
            check_scalar(f"losses[{name!r}]", losses[name], need_grad=False)
        return [losses[n] for n in self.names]

    def read_graph(self, losses: list) -> list:
        """This step's reach of each loss (``_NOTHING`` for a constant)."""
        return [reach(loss) if loss.requires_grad else _NOTHING for loss in losses]

    def check_reaches_groups(self, lay: StepGroups, reaches: list) -> None:
        """A loss that reaches no parameter of any group: the helper was built for another
        model (a copy, a rebuilt one). Frozen groups are fine."""
        members = lay.group_of
        if not members:
            return
        if not any(pid in members for r in reaches for pid in r.leaves):
            raise ValueError(
                f"{self.owner}: the losses reach none of the parameters of the groups "
                f"({', '.join(map(repr, self.names))}): was the helper built for another model (a copy, or a "
                f"model rebuilt since)? Build the helper from the model that computes these losses."
            )

    def check_disjoint(self, lay: StepGroups, uni_reaches: list) -> None:
        """Raises if a unimodal loss reaches another group's parameters (read off this
        step's graph; through a compiled graph the reach cannot be read: skipped)."""
        for m, r in enumerate(uni_reaches):
            if r.opaque:
                if not self._warned_opaque:
                    warnings.warn(
                        f"{self.owner}: the unimodal losses go through a torch.compile graph, whose backward "
                        f"links every output to every input, so mmfast cannot check that each unimodal loss "
                        f"reaches only its own group; the check is skipped. If a unimodal loss can reach "
                        f"another group, pass per_loss_backward=True.",
                        RuntimeWarning, stacklevel=3)
                    self._warned_opaque = True
                continue
            for pid in r.leaves:
                g = lay.group_of.get(pid)
                if g is not None and g != m:
                    raise ValueError(
                        f"the unimodal loss of group {self.names[m]!r} reaches group {self.names[g]!r} "
                        f"(parameter {lay.labels[pid]}): one backward of the summed unimodal losses would mix "
                        f"it into {self.names[g]!r}'s unimodal gradient. Detach the features that cross, or pass "
                        f"per_loss_backward=True (one backward per unimodal loss)."
                    )

    def note_window(self, reaches: list) -> None:
        for r in reaches:
            self._window.update(r.leaves)

    def end_step(self) -> None:
        """The step-level work is done (outside ``no_sync``, combined): a new window."""
        self._window = {}

    @staticmethod
    def run(calls: list, keep: bool = False) -> None:
        """Backward of each ``(loss, inputs or None)``, keeping the graph until the last one
        (and after it with ``keep``). Constant losses and empty ``inputs`` are skipped."""
        calls = [(loss, inputs) for loss, inputs in calls if loss.requires_grad and (inputs is None or inputs)]
        for i, (loss, inputs) in enumerate(calls):
            torch.autograd.backward(loss, inputs=inputs, retain_graph=keep or i + 1 < len(calls))

    @staticmethod
    def take_grads(params: list) -> list:
        """Each parameter's ``.grad``, which is then set to None."""
        out = [p.grad for p in params]
        for p in params:
            p.grad = None
        return out

    # ------------------------------------------------------------ accumulation

    def take_accumulated(self, params: list) -> dict | None:
        """Call first in ``backward``: the running sums of the global-batch form
        ``{id(param): sums per objective}``, or None if there are none or somebody
        touched ``.grad`` since (``zero_grad`` in either form: the sums are dropped, as a
        plain accumulation would lose them). Every accumulating parameter's ``.grad`` is
        put back to what it held before the accumulation started."""
        if self._acc is None:
            return None
        state, self._acc = self._acc, None
        valid = all(_token(p.grad) == tok for p, _, _, tok in state.values())
        for p, _, before, tok in state.values():
            if _token(p.grad) == tok:
                p.grad = before  # (also for a parameter that has left its group since)
        return {pid: sums for pid, (_, sums, _, _) in state.items()} if valid else None

    def accumulate(self, params: list, grads: list, prev: list) -> None:
        """Global-batch form (``combine=False``): keep the raw per-objective sums
        ``grads[k][i]`` for the next ``backward``. Meanwhile ``.grad`` of a group
        parameter holds one of its running sums (not an update): that is how a
        ``zero_grad`` in between is noticed (``take_accumulated``)."""
        state = {}
        for i, p in enumerate(params):
            sums = [k[i] for k in grads]
            p.grad = next((g for g in sums if g is not None), None)
            state[id(p)] = (p, sums, prev[i], _token(p.grad))
        self._acc = state

    # ------------------------------------------------------------- the passes

    def run_passes(self, lay: StepGroups, passes: list, *, collect: list, acc: dict | None, combine: bool) -> list:
        """The backward passes of one call, and the communication that goes with them.

        ``passes[k] = (calls, reached)``: the backward calls of pass k (see ``run``) and
        the ids of the leaves they reach (this step's graph). ``collect``: parameters
        whose gradient is taken out after each pass (one objective per pass), merged
        with the running sums ``acc``; returns ``grads[k][i]``. Across ranks (when
        combining) every objective's gradients are averaged, and at the step level
        (outside ``no_sync``) so are the other gradients, in place: each bucket's
        all-reduce starts as soon as its gradients are final, during the passes.
        """
        K = len(passes)
        sync_obj = self.sync.active and combine and bool(collect)
        rest = self.rest_params(lay, skip_members=bool(collect)) if (
            self.sync.active and combine and not self._in_no_sync) else []
        streams = ([collect] * K if sync_obj else []) + ([rest] if rest else [])
        whats = ["the groups' per-objective gradients"] * (K if sync_obj else 0) + ["the other gradients"]
        avg = Averaging(self.sync, streams, whats) if streams else None
        r = len(streams) - 1  # the rest's stream
        last = {pid: k for k, (_, reached) in enumerate(passes) for pid in reached}
        for j, p in enumerate(rest):
            if id(p) not in last:  # final already: no pass reaches it
                avg.ready(r, j, p.grad)
        if avg is not None:
            self._hook(collect if sync_obj else [], rest)
        grads = []
        for k, (calls, _) in enumerate(passes):
            if avg is not None:
                active = {id(p): (k, i) for i, p in enumerate(collect)} if sync_obj else {}
                active.update({id(p): (r, j) for j, p in enumerate(rest) if last.get(id(p)) == k})
                self._active = (active, avg, acc)
            try:
                self.run(calls, keep=k + 1 < K)
            finally:
                self._active = None
            g = self.take_grads(collect)
            merged = [avg.values[k][i] if sync_obj and avg.done[k][i] else
                      (_add(acc[id(p)][k], g[i]) if acc and id(p) in acc else g[i]) for i, p in enumerate(collect)]
            if sync_obj:
                avg.ready_all(k, merged)
            grads.append(merged)
        if rest:
            avg.ready_all(r, [p.grad for p in rest])
        if avg is not None:
            values = avg.wait()
            if sync_obj:
                grads = values[:K]
            for p, v in zip(rest, values[r] if rest else ()):
                if p.grad is None and v is not None:
                    p.grad = v
        return grads

    def rest_params(self, lay: StepGroups, skip_members: bool) -> list:
        """What is averaged at the step level: DDP's parameters with ``ddp=``, else every
        leaf the losses reached since the last step-level sync (every rank must agree;
        checked) and the members; without the groups' own if ``skip_members``."""
        params = self.sync.model_params()
        if params is None:
            params = [t for t in self._window.values() if t.requires_grad]
            seen = {id(t) for t in params}
            params += [p for p in lay.params if id(p) not in seen]
            self.sync.check_same([p.numel() for p in params], "parameters with gradients",
                                 params[0].device if params else "cpu")
        skip = set(lay.group_of) if skip_members else ()
        return [p for p in params if id(p) not in skip]

    def _hook(self, *lists) -> None:
        """Post-accumulate-grad hooks on the parameters whose all-reduce may start during
        a pass (registered once per parameter; they act only inside ``run_passes``)."""
        for ps in lists:
            for p in ps:
                if id(p) not in self._hooks:
                    self._hooks[id(p)] = (p.register_post_accumulate_grad_hook(self._on_grad), p)

    def _on_grad(self, p) -> None:
        st = self._active
        if st is None:
            return
        active, avg, acc = st
        e = active.get(id(p))
        if e is not None:
            s, i = e
            v = p.grad
            if acc and s < len(avg.streams) - 1 and id(p) in acc:  # an objective stream: add the running sum
                v = _add(acc[id(p)][s], v)
            avg.ready(s, i, v)

    def clip_params(self, lay: StepGroups) -> list:
        """Every parameter a loss reached since the last clip, plus the groups' and the
        extra sets' members: what ``clip_grad_norm_(model.parameters())`` would see."""
        seen, out = set(), []
        window = [lay.leaf.get(id(t), t) for t in self._window.values()]  # FSDP2: where the gradient went
        for t in list(lay.params) + [p for ps in lay.extra.values() for p in ps] + window:
            if id(t) not in seen and t.requires_grad:
                seen.add(id(t))
                out.append(t)
        ddp_params = self.sync.model_params()
        for t in ddp_params or ():
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out


def apply_update(params, group_ids, grads, prev, names, op):
    """``op(outs, grads_per_objective, group_ids)`` (``combine_`` or ``aggregate_``, writing
    into objective 0's tensors) over the parameters that got a gradient from some
    objective (a missing one counts as zeros), then ``.grad = prev + update``; a
    parameter that got none keeps ``prev``. Group ids are renumbered over the groups
    that have such a parameter; ``stats.names`` says which."""
    keep = [i for i in range(len(params)) if any(gk[i] is not None for gk in grads)]
    present = sorted({group_ids[i] for i in keep})
    renum = {g: j for j, g in enumerate(present)}
    outs, flat, back = [], [[] for _ in grads], []
    for i in keep:
        like = next(gk[i] for gk in grads if gk[i] is not None)
        full = [gk[i] if gk[i] is not None else torch.zeros_like(like) for gk in grads]
        if is_sharded(like):  # FSDP2: the op works on the local shards itself
            outs.append(full[0])
            for k, x in enumerate(full):
                flat[k].append(x)
            continue
        views = [dense_1d(x) for x in full]
        if any(v is None for v in views) or any(x.stride() != full[0].stride() for x in full):  # rare layouts
            views = [x.contiguous().view(-1) for x in full]
            back.append((full[0], views[0]))
        outs.append(full[0])
        for k, v in enumerate(views):
            flat[k].append(v)
    stats = op(flat, [renum[group_ids[i]] for i in keep]) if keep else None
    for x, v in back:
        x.copy_(v.view_as(x))
    for i, g in zip(keep, outs):
        params[i].grad = g if prev[i] is None else prev[i].add_(g)
    kept = set(keep)
    for i in range(len(params)):
        if i not in kept:
            params[i].grad = prev[i]
    return stats, tuple(names[g] for g in present)


def _add(x, y):
    if x is None:
        return y
    if y is None:
        return x
    return x.add_(y)


def _token(t):
    return None if t is None else (id(t), t._version)
