"""Processes for tests/test_distributed.py (spawned; must be importable)."""
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
        if dgl:
            self.fusion_module = nn.Linear(16, 4)
        else:
            self.fusion_module = nn.Linear(16, 4)
            self.head_audio = nn.Linear(8, 4)
            self.head_visual = nn.Linear(8, 4)

    def forward(self, x_a, x_v):
        f_a, f_v = self.audio_net(x_a), self.visual_net(x_v)
        if self.dgl:
            f = self.fusion_module
            return (f(torch.cat([f_a, f_v], 1).detach()), f(torch.cat([f_a, torch.zeros_like(f_v)], 1)),
                    f(torch.cat([torch.zeros_like(f_a), f_v], 1)))
        return self.fusion_module(torch.cat([f_a, f_v], 1)), self.head_audio(f_a), self.head_visual(f_v)


def batch(step: int):
    """16 samples whose two halves disagree: different inputs scale and labels."""
    g = torch.Generator().manual_seed(100 + step)
    x_a, x_v = torch.randn(16, 12, generator=g), torch.randn(16, 10, generator=g)
    x_a[8:] *= -3.0
    y = torch.cat([torch.randint(0, 2, (8,), generator=g), torch.randint(2, 4, (8,), generator=g)])
    return x_a, x_v, y


def make(method: str, model, **kw):
    groups = {"audio": model.audio_net, "visual": model.visual_net}
    if method == "mmpareto":
        return mmfast.MMPareto(groups, **kw)
    return mmfast.DGL(groups, fusion=model.fusion_module, alpha=4.0, max_norm=0.5, **kw)


def train(method: str, rank=None, world=1, mode="plain", bad_rank=None):
    """STEPS SGD steps; returns (grads per step, final parameters)."""
    torch.manual_seed(0)
    model = TinyAV(dgl=method == "dgl")
    net = model
    kw = {}
    ddp_calls = []
    if world > 1 and mode == "ddp":
        net = nn.parallel.DistributedDataParallel(model)

        def spy(state, bucket):  # DDP's reducer must stay silent: mmfast communicates
            ddp_calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        net.register_comm_hook(None, spy)
        kw["ddp"] = net
    elif world > 1 and mode == "plain":
        kw["process_group"] = dist.group.WORLD
    helper = make(method, model, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    for step in range(STEPS):
        x_a, x_v, y = batch(step)
        if rank is not None and world > 1:
            x_a, x_v, y = (t.chunk(world)[rank] for t in (x_a, x_v, y))
        if rank is not None and world == 1 and mode == "local":  # one half, no communication
            x_a, x_v, y = (t.chunk(2)[rank] for t in (x_a, x_v, y))
        opt.zero_grad(set_to_none=True)
        out, out_a, out_v = net(x_a, x_v)
        losses = {"audio": ce(out_a, y), "visual": ce(out_v, y)}
        if bad_rank is not None and rank == bad_rank:
            losses.pop("visual")  # this rank raises before communicating
        helper.backward(ce(out, y), losses)
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
        opt.step()
    if ddp_calls:
        raise AssertionError(f"DDP's reducer communicated {len(ddp_calls)} times")
    return grads, [p.detach().clone() for p in model.parameters()]


def worker(rank: int, world: int, init_file: str, out_dir: str, method: str, mode: str, bad_rank) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=15))
        result = train(method, rank, world, mode, bad_rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception as e:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
