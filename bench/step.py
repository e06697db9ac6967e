"""The step workload of BENCHMARKS.md: a whole training step, published loop vs mmfast.

    .venv/bin/python bench/step.py [--reps N]

Model: two ResNet-18 encoders (1x64x64 audio, 3x64x64 visual), concat head and two
unimodal heads (mmfast.models.resnet18_av), batch 8, SGD, on the CPU. The
published loops are the literal transcriptions in tests/published.py. Both sides
get the same inputs; their gradients are checked equal before anything is timed.
Peak memory: each variant runs alone in a fresh process; its peak resident set
(VmHWM) is reported, and the tracked gradient bytes of the helper.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import mmfast  # noqa: E402
from mmfast.models import resnet18_av, resnet18_av_dgl  # noqa: E402
from published import published_dgl_step, published_mmpareto_step  # noqa: E402
from workloads import median_time, peak_rss_mb  # noqa: E402

ce = nn.CrossEntropyLoss()
BATCH, CLASSES = 8, 6


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, 1, 64, 64, generator=g), torch.randn(BATCH, 3, 64, 64, generator=g),
            torch.randint(0, CLASSES, (BATCH,), generator=g))


def setup(method: str, variant: str, seed: int = 0):
    """(step function, model) for one side; the step leaves the gradients in .grad."""
    torch.manual_seed(seed)
    model = resnet18_av(CLASSES) if method == "mmpareto" else resnet18_av_dgl(CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x_a, x_v, y = batch(seed)
    groups = {"audio": model.audio_net, "visual": model.visual_net}
    if variant == "published" and method == "mmpareto":
        return (lambda: published_mmpareto_step(model, opt, x_a, x_v, y)), model
    if variant == "published":
        return (lambda: published_dgl_step(model, x_a, x_v, y, alpha=4.0, max_norm=40.0)), model
    helper = (mmfast.MMPareto(groups) if method == "mmpareto"
              else mmfast.DGL(groups, fusion=model.fusion_module, alpha=4.0, max_norm=40.0))

    def step():
        opt.zero_grad(set_to_none=True)
        out, out_a, out_v = model(x_a, x_v)
        return helper.backward(ce(out, y), {"audio": ce(out_a, y), "visual": ce(out_v, y)})

    step.helper = helper
    return step, model


def check_equal(method: str) -> float:
    """Max gradient difference (relative to the largest gradient) between the two sides."""
    ref_step, ref = setup(method, "published")
    our_step, ours = setup(method, "mmfast")
    ours.load_state_dict(ref.state_dict())
    ref_step()
    our_step()
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    err = 0.0
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        if (p.grad is None) != (q.grad is None):
            raise SystemExit(f"{method}: {name} has a gradient on one side only")
        if p.grad is not None:
            err = max(err, (p.grad - q.grad).abs().max().item() / scale)
    # 1e-4: the published clip_grad_norm_ sums 22 M squares in fp32 (about 1e-5 off);
    # mmfast's norm is fp32 blockwise + fp64, so the clip coefficients differ that much.
    if err > 1e-4:
        raise SystemExit(f"{method}: gradients differ by {err:.2e} of the largest: not timing a wrong answer")
    return err


def step_peak_mb(method: str, variant: str, steps: int = 3) -> float:
    """Peak resident memory of a fresh process running `steps` steps of one variant."""
    return peak_rss_mb(f"import step as s\nfn, _ = s.setup({method!r}, {variant!r})\nfor _ in range({steps}): fn()")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
          f"cpu backend: {mmfast.backends()['cpu'].available}")
    rows = []
    for method in ("mmpareto", "dgl"):
        err = check_equal(method)
        times = {}
        for variant in ("published", "mmfast"):
            fn, model = setup(method, variant)
            times[variant] = median_time(fn, args.reps, warmup=1)
            if variant == "mmfast":
                helper = fn.helper
                grad_bytes = sum(b.numel() * b.element_size() for f in helper.flat for b in f.buffers)
                enc_bytes = sum(p.numel() * p.element_size() for p in helper.params)
        mem = {v: step_peak_mb(method, v) for v in ("published", "mmfast")}
        rows.append((method, times, mem, err, grad_bytes / enc_bytes))
    print()
    print("| step | published ms | mmfast ms | speed-up | peak RSS published MB | peak RSS mmfast MB | "
          "grad err | helper buffers / encoder grads |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, t, m, err, ratio in rows:
        print(f"| {method} | {t['published'] * 1e3:.0f} | {t['mmfast'] * 1e3:.0f} | "
              f"{t['published'] / t['mmfast']:.2f}x | {m['published']:.0f} | {m['mmfast']:.0f} | {err:.1e} | "
              f"{ratio:.1f} |")
    t, m = rows[0][1], rows[0][2]
    print()
    print("| target | measured | goal | met |")
    print("|---|---:|---:|---|")
    speed = t["published"] / t["mmfast"]
    print(f"| MMPareto step vs published loop | {speed:.2f}x | >= 4x | {'yes' if speed >= 4 else 'NO'} |")
    lower = m["mmfast"] < m["published"]
    print(f"| MMPareto step peak memory | {m['mmfast']:.0f} vs {m['published']:.0f} MB | lower | "
          f"{'yes' if lower else 'NO'} |")


if __name__ == "__main__":
    main()
