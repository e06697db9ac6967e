"""K objectives on resnet18-av-sized buffers: mmfast.aggregate_ against the
concatenate-Gram-solve-combine pattern of the multi-task libraries and against torchjd
itself (its aggregator on the stacked K x N Jacobian), plus the aggregation step alone
on tiny tensors (where the weighting is all the cost) before (the pure-PyTorch
interior-point weightings, mmfast.weightings.reference) and after (the exact one-op
solvers), K up to 32.

    .venv/bin/python bench/multi.py [--weighting upgrad] [--reps 5] [--ks 2 4 8 32]

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


def _torchjd(weighting):
    import torchjd.aggregation as agg

    return {"upgrad": agg.UPGrad, "mgda": agg.MGDA, "pcgrad": agg.PCGrad, "imtlg": agg.IMTLG,
            "cagrad": lambda: agg.CAGrad(c=0.5)}[weighting]()


def torchjd_step(out, grads, aggregator):
    """torchjd's aggregation of the stacked K x N Jacobian, split back into the tensors."""
    J = torch.stack([torch.cat([t.reshape(-1) for t in gk]) for gk in grads])
    d = aggregator(J)
    for o, dd in zip(out, torch.split(d, [t.numel() for t in out])):
        o.copy_(dd.view_as(o))


def before_step(out, grads, weighting):
    """mmfast before issue 16: the fused passes around the pure-PyTorch weightings."""
    from mmfast.ops import _multi
    from mmfast.weightings import reference

    per, _ = _multi._gram_k(grads)
    w = reference.weights(weighting, per.sum(0)[None])[0]
    coefs = w.expand(len(out), len(grads)).contiguous()
    torch.ops.mmfast.combine_k_(out, _multi._flat(grads), len(grads), coefs)


def run(path, out, grads, weighting, aggregator=None):
    if path == "mmfast":
        mmfast.aggregate_(out, grads, weighting=weighting, groups=[0] * len(out))
    elif path == "before":
        before_step(out, grads, weighting)
    elif path == "torchjd":
        torchjd_step(out, grads, aggregator)
    else:
        concat_gram_solve(out, grads, weighting)


def tiny_table(ks, reps):
    """Aggregation time per step where the weighting is all the cost (8 one-element tensors)."""
    print("\n| weighting | K | before ms | after ms | torchjd ms | before / after | torchjd / after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for weighting in ("upgrad", "mgda", "cagrad", "imtlg", "pcgrad"):
        try:
            aggregator = _torchjd(weighting)
        except ImportError:
            aggregator = None
        for K in ks:
            g = torch.Generator().manual_seed(K)
            grads = [[torch.randn(1, generator=g) for _ in range(8)] for _ in range(K)]
            out = [torch.empty(1) for _ in range(8)]
            t = {}
            for path in ("before", "mmfast", "torchjd"):
                if path == "torchjd" and aggregator is None:
                    t[path] = float("nan")
                    continue
                n = 3 if path == "before" and K > 8 else 20
                t[path] = median_time(lambda: run(path, out, grads, weighting, aggregator), max(reps, n))
            print(f"| {weighting} | {K} | {t['before'] * 1e3:.3f} | {t['mmfast'] * 1e3:.3f} | "
                  f"{t['torchjd'] * 1e3:.3f} | {t['before'] / t['mmfast']:.1f}x | {t['torchjd'] / t['mmfast']:.1f}x |")


def peak_mb(path: str, K: int, weighting: str) -> float:
    return peak_rss_mb(f"import multi as m\nout, grads = m.inputs({K})\n"
                       f"for _ in range(2): m.run({path!r}, out, grads, {weighting!r})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weighting", default="upgrad")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="numbers of objectives")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--tiny-only", action="store_true", help="only the tiny-tensor (weighting cost) table")
    args = p.parse_args()
    if args.tiny_only:
        tiny_table(args.ks, args.reps)
        return
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, weighting {args.weighting}")
    print("| K | concat-Gram-solve ms | torchjd ms | mmfast ms | vs concat | vs torchjd | peak MB concat | "
          "peak MB mmfast | K·N·4 MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    try:
        aggregator = _torchjd(args.weighting)
    except ImportError:
        aggregator = None
    for K in args.ks:
        out, grads = inputs(K)
        ref = [torch.empty_like(o) for o in out]
        run("concat", ref, grads, args.weighting)
        run("mmfast", out, grads, args.weighting)
        scale = max(r.abs().max().item() for r in ref)
        err = max((o - r).abs().max().item() for o, r in zip(out, ref))
        assert err <= 1e-4 * scale, f"K={K}: results differ by {err:.2e}"
        t = {path: median_time(lambda: run(path, out if path == "mmfast" else ref, grads, args.weighting, aggregator),
                               args.reps)
             for path in ("concat", "mmfast") + (("torchjd",) if aggregator is not None else ())}
        t.setdefault("torchjd", float("nan"))
        mem = {path: float("nan") if args.no_memory else peak_mb(path, K, args.weighting)
               for path in ("concat", "mmfast")}
        kn = K * sum(o.numel() for o in out) * 4 / 2**20
        print(f"| {K} | {t['concat'] * 1e3:.1f} | {t['torchjd'] * 1e3:.1f} | {t['mmfast'] * 1e3:.1f} | "
              f"{t['concat'] / t['mmfast']:.2f}x | {t['torchjd'] / t['mmfast']:.2f}x | "
              f"{mem['concat']:.0f} | {mem['mmfast']:.0f} | {kn:.0f} |")
    tiny_table(args.ks, args.reps)


if __name__ == "__main__":
    main()
