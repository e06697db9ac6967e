"""The step workload of BENCHMARKS.md: a whole training step, published loop vs mmfast,
and mmfast against its own floor.

    .venv/bin/python bench/step.py [--reps N]

Model: two ResNet-18 encoders (1x64x64 audio, 3x64x64 visual), concat head and two
unimodal heads (testbed/models.py, resnet18_av), batch 8, SGD, on the CPU. The
published loops are the literal transcriptions in tests/published.py. Both sides
get the same inputs; their gradients are checked equal before anything is timed.

* floor: ``zero_grad(set_to_none=True)``, the forward and the two backward passes the
  helper needs (``L_mm`` with the graph kept, then the sum of the unimodal losses),
  nothing else: what the helper step costs with a free combine.
* host: what the helper does per step besides the passes and the combine: looking
  its groups up (``Groups.resolve``) and reading the step's graph (the unimodal losses'
  for MMPareto on one process; all three for DGL).
* peak memory: each variant runs alone in a fresh process (peak resident set,
  VmHWM); the helper's extra over the floor is compared with one copy of the
  groups' gradients (BENCHMARKS.md: at most one extra copy).

Variants are timed in interleaved rounds (the machine is shared and noisy).
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
sys.path.append(os.path.join(HERE, ".."))  # testbed (appended: an installed mmfast still wins)
import mmfast  # noqa: E402
from testbed.models import resnet18_av, resnet18_av_dgl  # noqa: E402
from published import published_dgl_step, published_mmpareto_step  # noqa: E402
from workloads import interleaved, median, median_time, peak_rss_mb  # noqa: E402

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
    if variant == "floor":
        def floor():
            opt.zero_grad(set_to_none=True)
            out, out_a, out_v = model(x_a, x_v)
            ce(out, y).backward(retain_graph=True)
            (ce(out_a, y) + ce(out_v, y)).backward()
        return floor, model
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


def host_cost(method: str, reps: int = 20) -> float:
    """Median seconds of the helper's per-step host work: group lookup and graph walks."""
    fn, model = setup(method, "mmfast")
    helper = fn.helper
    x_a, x_v, y = batch(0)
    out, out_a, out_v = model(x_a, x_v)
    losses = [ce(out, y), ce(out_a, y), ce(out_v, y)]

    walked = losses[1:] if method == "mmpareto" else losses  # MMPareto reads L_mm's graph only when needed

    def host():
        helper.groups.resolve()
        helper.read_graph(walked)

    return median_time(host, reps, warmup=2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
          f"cpu backend: {mmfast.backends()['cpu'].available}")
    rows = []
    for method in ("mmpareto", "dgl"):
        err = check_equal(method)
        fns = {v: setup(method, v)[0] for v in ("published", "mmfast", "floor")}
        times = {k: median(ts) for k, ts in interleaved(fns, args.reps).items()}
        host = host_cost(method)
        group_bytes = sum(p.numel() * p.element_size() for p in fns["mmfast"].helper.groups.resolve().params)
        mem = {v: step_peak_mb(method, v) for v in ("published", "mmfast", "floor")}
        rows.append((method, times, mem, err, host, group_bytes / 2**20))
    print()
    print("| step | published ms | mmfast ms | floor ms | vs published | vs floor | host ms (share) | "
          "peak RSS published / mmfast / floor MB | mmfast - floor MB | one copy of group grads MB | grad err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, t, m, err, host, copy_mb in rows:
        print(f"| {method} | {t['published'] * 1e3:.0f} | {t['mmfast'] * 1e3:.0f} | {t['floor'] * 1e3:.0f} | "
              f"{t['published'] / t['mmfast']:.2f}x | {t['mmfast'] / t['floor']:.3f} | "
              f"{host * 1e3:.2f} ({host / t['mmfast']:.2%}) | {m['published']:.0f} / {m['mmfast']:.0f} / "
              f"{m['floor']:.0f} | {m['mmfast'] - m['floor']:.0f} | {copy_mb:.0f} | {err:.1e} |")
    method, t, m, err, host, copy_mb = rows[0]
    print()
    print("| target (MMPareto step) | measured | goal | met |")
    print("|---|---:|---:|---|")
    speed, floor, share = t["published"] / t["mmfast"], t["mmfast"] / t["floor"], host / t["mmfast"]
    extra = m["mmfast"] - m["floor"]
    print(f"| vs the published loop | {speed:.2f}x | >= 2.5x | {'yes' if speed >= 2.5 else 'NO'} |")
    print(f"| vs its floor | {floor:.3f} | <= 1.05 | {'yes' if floor <= 1.05 else 'NO'} |")
    print(f"| host work (group lookup, graph reading) | {share:.2%} | < 1% | {'yes' if share < 0.01 else 'NO'} |")
    print(f"| extra memory over the floor | {extra:.0f} MB | <= {copy_mb:.0f} MB (one copy) | "
          f"{'yes' if extra <= 1.1 * copy_mb else 'NO'} |")


if __name__ == "__main__":
    main()
