"""Processes for tests/test_distributed.py (spawned; must be importable).

``train(method, scenario, rank, world, mode)`` runs STEPS optimizer steps of a training
loop; with ``world == 1`` it is the single-process reference on the whole batch, which
the ranks (each on its half of every batch) must reproduce.

Scenarios (the loops of tests/test_loops.py, distributed):
* ``plain``: one backward per step.
* ``accum``: two micro-batches per step, the first inside ``helper.no_sync()``.
* ``global``: MMPareto's global-batch form: ``combine=False``, then ``combine=True``.
* ``missing``: in step 1 rank 1's batch has no visual modality (its visual loss is a
  constant 0). As with plain DDP, the gradients are averaged over the ranks, so the
  single-process equivalent is the visual loss of rank 0's half, halved.
* ``branch``: from step 1 on, an extra head joins the multimodal loss (every rank).
* ``branch1``: the extra head is used on rank 0 only (a data-dependent branch).
* ``uneven``: the last step's batch has 15 samples (8 on rank 0, 7 on rank 1); as with
  plain DDP each rank's losses are means over its own samples and the gradients are
  averaged, so the reference averages the two halves' losses.

Modes: ``plain`` (``process_group=``), ``ddp`` (``ddp=``), ``fsdp`` (``fully_shard`` on
each encoder, then on the model) and ``fsdp-mp`` (the same with bf16 parameters and
fp32 reduction, ``MixedPrecisionPolicy``).
"""
from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

import mmfast

STEPS = 3
ce = nn.CrossEntropyLoss()


class TinyAV(nn.Module):
    """No batch norm: per-rank statistics would differ from the global batch's."""

    def __init__(self, dgl: bool = False):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
        self.visual_net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 8))
        self.dgl = dgl
        self.fusion_module = nn.Linear(16, 4)
        self.extra_head = nn.Linear(8, 4)
        if not dgl:
            self.head_audio = nn.Linear(8, 4)
            self.head_visual = nn.Linear(8, 4)

    def forward(self, x_a, x_v, extra=False):
        f_a, f_v = self.audio_net(x_a), self.visual_net(x_v)
        if self.dgl:
            f = self.fusion_module
            out, out_a, out_v = (f(torch.cat([f_a, f_v], 1).detach()), f(torch.cat([f_a, torch.zeros_like(f_v)], 1)),
                                 f(torch.cat([torch.zeros_like(f_a), f_v], 1)))
        else:
            out, out_a, out_v = self.fusion_module(torch.cat([f_a, f_v], 1)), self.head_audio(f_a), self.head_visual(f_v)
        if extra is not False:  # True, or a [B] mask of the samples that take the branch
            e = self.extra_head(f_a.detach() if self.dgl else f_a)
            out = out + (e if extra is True else e * extra[:, None])
        return out, out_a, out_v


def batch(step: int, micro: int = 0):
    """16 samples whose two halves disagree: different inputs scale and labels."""
    g = torch.Generator().manual_seed(100 + 10 * step + micro)
    x_a, x_v = torch.randn(16, 12, generator=g), torch.randn(16, 10, generator=g)
    x_a[8:] *= -3.0
    y = torch.cat([torch.randint(0, 2, (8,), generator=g), torch.randint(2, 4, (8,), generator=g)])
    return x_a, x_v, y


def make(method: str, model, **kw):
    groups = {"audio": model.audio_net, "visual": model.visual_net}
    if method == "mmpareto":
        return mmfast.MMPareto(groups, **kw)
    if method == "multi":
        return mmfast.MultiObjective(groups, 3, weighting="upgrad", **kw)
    return mmfast.DGL(groups, fusion=model.fusion_module, alpha=4.0, max_norm=0.5, **kw)


def step_losses(net, x_a, x_v, y, *, scenario, step, rank, world):
    """The three losses of one (micro-)batch, as this rank (or the reference) sees them."""
    extra = scenario == "branch" and step >= 1
    if scenario == "branch1" and step >= 1:
        # rank 0's half takes the branch; the reference: the first half of the batch
        extra = rank == 0 if world > 1 else torch.arange(len(y)) < len(y) // 2
    out, out_a, out_v = net(x_a, x_v, extra=extra)
    if scenario == "fail" and step == 1 and rank == 1:  # user code raising mid-training on one rank
        raise RuntimeError("rank 1 fails at step 1")
    if scenario == "uneven" and step == STEPS - 1 and world == 1:  # the mean of the two ranks' means
        return tuple((ce(o[:8], y[:8]) + ce(o[8:], y[8:])) / 2 for o in (out, out_a, out_v))
    l_mm, l_a, l_v = ce(out, y), ce(out_a, y), ce(out_v, y)
    if scenario == "missing" and step == 1:
        if world > 1 and rank == 1:
            l_v = torch.zeros(())
        elif world == 1:  # the reference: rank 0's half only, averaged with rank 1's zero
            l_v = 0.5 * ce(out_v[:8], y[:8])
    return l_mm, l_a, l_v


def call(helper, method, losses, **kw):
    l_mm, l_a, l_v = losses
    if method == "multi":
        return helper.backward([l_mm, l_a, l_v], **kw)
    return helper.backward(l_mm, {"audio": l_a, "visual": l_v}, **kw)


def train(method: str, scenario: str = "plain", rank=None, world=1, mode="plain"):
    """STEPS SGD steps; returns (grads per step, final parameters)."""
    torch.manual_seed(0)
    model = TinyAV(dgl=method == "dgl")
    net = model
    kw = {}
    ddp_calls = []
    if world > 1 and mode == "ddp":
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

        def spy(state, bucket):  # DDP's reducer must stay silent: mmfast communicates
            ddp_calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        net.register_comm_hook(None, spy)
        kw["ddp"] = net
    elif world > 1 and mode == "plain":
        kw["process_group"] = dist.group.WORLD
    elif world > 1 and mode.startswith("fsdp"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if mode == "fsdp-mp" else MixedPrecisionPolicy()
        for m in (model.audio_net, model.visual_net, model):
            fully_shard(m, mp_policy=policy)
    helper = make(method, model, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    micros = 2 if scenario in ("accum", "global") else 1
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for micro in range(micros):
            x_a, x_v, y = batch(step, micro)
            if scenario == "uneven" and step == STEPS - 1:
                x_a, x_v, y = x_a[:15], x_v[:15], y[:15]
            if rank is not None and world > 1:
                x_a, x_v, y = (t.chunk(world)[rank] for t in (x_a, x_v, y))
            if rank is not None and world == 1 and mode == "local":  # one half, no communication
                x_a, x_v, y = (t.chunk(2)[rank] for t in (x_a, x_v, y))
            losses = step_losses(net, x_a, x_v, y, scenario=scenario, step=step, rank=rank, world=world)
            losses = [loss / micros for loss in losses]
            last = micro + 1 == micros
            if scenario == "global":
                call(helper, method, losses, combine=last)
            elif last:
                call(helper, method, losses)
            else:
                with helper.no_sync():
                    call(helper, method, losses)
        grads.append([full(p.grad) for p in model.parameters()])
        opt.step()
    if ddp_calls:
        raise AssertionError(f"DDP's reducer communicated {len(ddp_calls)} times")
    return grads, [full(p.detach()) for p in model.parameters()]


def full(t):
    """A plain copy of a tensor, gathered if it is a sharded DTensor (a collective)."""
    if t is None:
        return None
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().clone()


def check_fsdp_mp(method: str, rank: int, world: int) -> float:
    """With bf16 parameters no single process reproduces FSDP's numbers, so the helper is
    checked against the definition on the gradients FSDP itself produces for each loss
    (plain backward passes, gathered), on the same forward: the largest difference
    relative to the largest expected gradient, over STEPS steps."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = TinyAV(dgl=method == "dgl")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for m in (model.audio_net, model.visual_net, model):
        fully_shard(m, mp_policy=policy)
    helper = make(method, model)
    params = list(model.parameters())
    enc = {id(p): g for g, m in enumerate((model.audio_net, model.visual_net)) for p in m.parameters()}
    fusion = {id(p) for p in model.fusion_module.parameters()}
    opt = torch.optim.SGD(params, lr=0.5)
    worst = 0.0
    for step in range(STEPS):
        x_a, x_v, y = (t.chunk(world)[rank] for t in batch(step))
        per_loss = []
        for pick in ((0,), (1, 2)):  # L_mm, then the unimodal losses
            model.zero_grad(set_to_none=True)
            losses = [ce(o, y) for o in model(x_a, x_v)]
            (sum(losses[i] for i in pick) * (4.0 if method == "dgl" and pick != (0,) else 1.0)).backward()
            per_loss.append([full(p.grad) for p in params])
        used = [i for i in range(len(params)) if per_loss[0][i] is not None or per_loss[1][i] is not None]
        a, b = ([g if g is not None else torch.zeros_like(full(params[i])) for i, g in enumerate(gs)] for gs in per_loss)
        if method == "mmpareto":
            ids = [i for i, p in enumerate(params) if id(p) in enc]
            out = [torch.empty_like(a[i]) for i in ids]
            mmfast.combine_(out, [a[i] for i in ids], [b[i] for i in ids], groups=[enc[id(params[i])] for i in ids],
                            backend="torch")
            want = [a[i] + b[i] for i in range(len(params))]
            for j, i in enumerate(ids):
                want[i] = out[j]
        else:  # DGL: encoders alpha * b, fusion a, then the clip over everything
            want = [b[i] if id(p) in enc else a[i] if id(p) in fusion else a[i] + b[i] for i, p in enumerate(params)]
            total = torch.stack([w.double().norm() for w in want]).norm()
            coef = min(1.0, 0.5 / (float(total) + 1e-6))
            want = [w * coef for w in want]
        model.zero_grad(set_to_none=True)
        out, out_a, out_v = model(x_a, x_v)
        helper.backward(ce(out, y), {"audio": ce(out_a, y), "visual": ce(out_v, y)})
        got = [full(p.grad) for p in params]
        assert [i for i, g in enumerate(got) if g is not None] == used
        scale = max(float(want[i].abs().max()) for i in used)
        worst = max(worst, max(float((got[i] - want[i]).abs().max()) for i in used) / scale)
        opt.step()
    return worst


def worker(rank: int, world: int, init_file: str, out_dir: str, method: str, mode: str, scenario: str,
           bad_rank, prefix: str = "") -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=15))
        if bad_rank is not None and rank == bad_rank:  # this rank raises before communicating
            model = TinyAV()
            helper = make(method, model, process_group=dist.group.WORLD)
            out, out_a, _ = model(*batch(0)[:2])
            helper.backward(ce(out, batch(0)[2]), {"audio": ce(out_a, batch(0)[2])})
        result = check_fsdp_mp(method, rank, world) if mode == "fsdp-mp" else train(method, scenario, rank, world, mode)
        torch.save(result, os.path.join(out_dir, f"{prefix}rank{rank}.pt"))
    except Exception as e:
        with open(os.path.join(out_dir, f"{prefix}rank{rank}.err"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def batch_worker(rank: int, world: int, out_dir: str, jobs: dict) -> None:
    """Runs every job ``{name: (method, mode, scenario)}`` in this one process, each in a
    process group of its own (results in ``out_dir/{name}-rank{r}.pt`` or ``.err``): the
    ranks start once for all of them (a start costs more than a job)."""
    for name, (method, mode, scenario) in jobs.items():
        worker(rank, world, os.path.join(out_dir, f"init-{name}"), out_dir, method, mode, scenario, None,
               prefix=f"{name}-")
