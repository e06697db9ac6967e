"""MMPareto and DGL with mmfast.combine_ on a tiny audio-visual model, by hand.

    .venv/bin/python examples/quickstart.py

Shows the op on its own: the per-loss gradients come from torch.autograd.grad,
combine_ writes the combined gradient, the optimizer steps. (The training-loop
helpers of issue 4 will own the backward passes and flat buffers for you.)
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


def main():
    torch.manual_seed(0)
    model = TinyAV()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x_a, x_v, y = torch.randn(64, 20), torch.randn(64, 30), torch.randint(0, 4, (64,))
    params = list(model.parameters())
    audio = {id(p) for p in model.audio_net.parameters()}
    visual = {id(p) for p in model.visual_net.parameters()}
    # Group 0: audio encoder, group 1: visual encoder, -1: heads and fusion (plain sum).
    groups = [0 if id(p) in audio else 1 if id(p) in visual else -1 for p in params]

    for step in range(20):
        out, out_a, out_v = model(x_a, x_v)
        ce = nn.functional.cross_entropy
        loss_mm, loss_a, loss_v = ce(out, y), ce(out_a, y), ce(out_v, y)
        g_mm = torch.autograd.grad(loss_mm, params, retain_graph=True, allow_unused=True)
        g_a = torch.autograd.grad(loss_a, params, retain_graph=True, allow_unused=True)
        g_v = torch.autograd.grad(loss_v, params, allow_unused=True)
        zeros = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
        grads_mm = [zeros(g, p) for g, p in zip(g_mm, params)]
        # Each tensor's unimodal gradient: its own modality's loss (their sum outside the groups).
        grads_uni = [zeros(ga, p) + zeros(gv, p) for ga, gv, p in zip(g_a, g_v, params)]
        stats = mmfast.combine_(grads_mm, grads_mm, grads_uni, groups=groups, gamma=1.5)  # in place
        for p, g in zip(params, grads_mm):
            p.grad = g
        opt.step()
        if step % 5 == 0:
            s = stats.as_dict()  # the one host sync, for logging
            print(f"step {step:2d}  loss {loss_mm.item():.3f}  cos(audio, visual) "
                  f"{s['cos'][0]:+.3f} {s['cos'][1]:+.3f}  w_mm {s['w_mm'][0]:.3f} {s['w_mm'][1]:.3f}")
    print("backends:", {k: v.available for k, v in mmfast.backends().items()})


if __name__ == "__main__":
    main()
