"""K objectives on resnet18-av-sized buffers: mmfast.aggregate_ against the
concatenate-Gram-solve-combine pattern of the multi-task libraries.

    .venv/bin/python bench/multi.py [--weighting upgrad] [--reps 5]

The baseline, as torchjd and LibMTL do it: concatenate each objective's gradients
into a K x N matrix J, G = J J^T, move G to the host and solve the weighting
there (the same weighting code as mmfast's), d = J^T w, split d back into the
tensors. Both paths are checked equal before timing. Peak memory: each path runs
alone in a fresh process (VmHWM), so the K x N copy shows.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mmfast  # noqa: E402
from mmfast.weightings import weights as weigh  # noqa: E402
from workloads import WORKLOADS, median_time, peak_rss_mb  # noqa: E402


def inputs(K: int, seed: int = 0):
    shapes, _ = WORKLOADS["resnet18-av"]()
    g = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(K)]
    return [torch.empty(s) for s in shapes], grads


def concat_gram_solve(out, grads, weighting):
    J = torch.stack([torch.cat([t.reshape(-1) for t in gk]) for gk in grads])  # K x N copy
    G = (J @ J.T).double()
    w = weigh(weighting, G.cpu()[None])[0]  # host solve: the sync these libraries make
    d = w.to(J.dtype) @ J
    for o, dd in zip(out, torch.split(d, [t.numel() for t in out])):
        o.copy_(dd.view_as(o))


def run(path, out, grads, weighting):
    if path == "mmfast":
        mmfast.aggregate_(out, grads, weighting=weighting, groups=[0] * len(out))
    else:
        concat_gram_solve(out, grads, weighting)


def peak_mb(path: str, K: int, weighting: str) -> float:
    return peak_rss_mb(f"import multi as m\nout, grads = m.inputs({K})\n"
                       f"for _ in range(2): m.run({path!r}, out, grads, {weighting!r})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weighting", default="upgrad")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="numbers of objectives")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = p.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, weighting {args.weighting}")
    print("| K | concat-Gram-solve ms | mmfast ms | speed-up | peak MB concat | peak MB mmfast | K·N·4 MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for K in args.ks:
        out, grads = inputs(K)
        ref = [torch.empty_like(o) for o in out]
        run("concat", ref, grads, args.weighting)
        run("mmfast", out, grads, args.weighting)
        scale = max(r.abs().max().item() for r in ref)
        err = max((o - r).abs().max().item() for o, r in zip(out, ref))
        assert err <= 1e-4 * scale, f"K={K}: results differ by {err:.2e}"
        t = {path: median_time(lambda: run(path, out if path == "mmfast" else ref, grads, args.weighting), args.reps)
             for path in ("concat", "mmfast")}
        mem = {path: float("nan") if args.no_memory else peak_mb(path, K, args.weighting)
               for path in ("concat", "mmfast")}
        kn = K * sum(o.numel() for o in out) * 4 / 2**20
        print(f"| {K} | {t['concat'] * 1e3:.1f} | {t['mmfast'] * 1e3:.1f} | {t['concat'] / t['mmfast']:.2f}x | "
              f"{mem['concat']:.0f} | {mem['mmfast']:.0f} | {kn:.0f} |")


if __name__ == "__main__":
    main()
