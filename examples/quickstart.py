"""mmfast in a training loop, two ways, on a tiny audio-visual model.

    .venv/bin/python examples/quickstart.py

1. ``mmfast.MMPareto``, the training helper: the two-line change to a loop
   (build it once with the encoders as groups; call ``backward`` instead of
   ``loss.backward()``). It owns the backward passes and writes every ``.grad``.
2. ``mmfast.combine_``, the op the helpers are built on: per-loss gradients from
   ``torch.autograd.grad``, combined in place, then handed to the optimizer.

Both give the same update (the script checks it). Statistics stay device tensors;
``stats.as_dict()`` is the one host sync, for logging. The maths: docs/semantics.md.
"""
import torch
from torch import nn

import mmfast


class TinyAV(nn.Module):
    def __init__(self, n_classes=4):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Linear(20, 32), nn.ReLU())
        self.visual_net = nn.Sequential(nn.Linear(30, 32), nn.ReLU())
        self.fusion_module = nn.Linear(64, n_classes)
        self.head_audio = nn.Linear(32, n_classes)
        self.head_visual = nn.Linear(32, n_classes)

    def forward(self, x_a, x_v):
        f_a, f_v = self.audio_net(x_a), self.visual_net(x_v)
        return self.fusion_module(torch.cat([f_a, f_v], 1)), self.head_audio(f_a), self.head_visual(f_v)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(64, 20, generator=g), torch.randn(64, 30, generator=g), torch.randint(0, 4, (64,), generator=g)


def losses(model, x_a, x_v, y):
    ce = nn.functional.cross_entropy
    out, out_a, out_v = model(x_a, x_v)
    return ce(out, y), ce(out_a, y), ce(out_v, y)


def train_with_helper(steps=20):
    torch.manual_seed(0)
    model = TinyAV()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mmp = mmfast.MMPareto({"audio": model.audio_net, "visual": model.visual_net}, gamma=1.5)  # once
    for step in range(steps):
        loss_mm, loss_a, loss_v = losses(model, *batch(step))
        opt.zero_grad()
        stats = mmp.backward(loss_mm, {"audio": loss_a, "visual": loss_v})  # instead of loss.backward()
        opt.step()
        if step % 5 == 0:
            s = stats.as_dict()  # per group, keyed by name
            print(f"step {step:2d}  loss {loss_mm.item():.3f}  cos(mm, uni) audio {s['cos']['audio']:+.3f} "
                  f"visual {s['cos']['visual']:+.3f}  w_mm {s['w_mm']['audio']:.3f} {s['w_mm']['visual']:.3f}")
    return model


def train_with_op(steps=20):
    torch.manual_seed(0)
    model = TinyAV()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    params = list(model.parameters())
    audio = {id(p) for p in model.audio_net.parameters()}
    visual = {id(p) for p in model.visual_net.parameters()}
    # Group 0: audio encoder, group 1: visual encoder, -1: heads and fusion (plain sum).
    groups = [0 if id(p) in audio else 1 if id(p) in visual else -1 for p in params]
    for step in range(steps):
        loss_mm, loss_a, loss_v = losses(model, *batch(step))
        grads_mm = torch.autograd.grad(loss_mm, params, retain_graph=True, materialize_grads=True)
        # Each tensor's unimodal gradient: its own modality's loss (their sum outside the groups).
        grads_uni = torch.autograd.grad(loss_a + loss_v, params, materialize_grads=True)
        mmfast.combine_(grads_mm, grads_mm, grads_uni, groups=groups, gamma=1.5)  # in place, into grads_mm
        for p, g in zip(params, grads_mm):
            p.grad = g
        opt.step()
    return model


def main():
    print("MMPareto helper:")
    a = train_with_helper()
    b = train_with_op()
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    print(f"helper vs combine_ by hand, after 20 steps: max |parameter difference| = {diff:.1e}")
    assert diff < 1e-5, diff
    print("backends:", {k: v.available for k, v in mmfast.backends().items()})


if __name__ == "__main__":
    main()
