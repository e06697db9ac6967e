"""One side-by-side table of every combine path on the BENCHMARKS.md workloads.

    .venv/bin/python bench/table.py [--quick] [--threads N]

Each row is checked against the reference before it is timed; times are medians
in this process (after a warm-up; --cold reads 128 MB before each repetition), and
ratios are what to quote (the machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmfast  # noqa: E402
from workloads import WORKLOADS, copy_bandwidth, host_cost, make_inputs, median_time  # noqa: E402

# ../shared/BENCHMARKS.md (CPU): floor <= 1.1x, sweep linearity <= 1.2x.
TARGETS = {"vs_reference": 20.0, "vs_foreach": 2.0, "vs_floor": 1.1, "sweep_linearity": 1.2, "host": 1.0}
HOST_SIZES = (120, 1000)  # one-element tensors (BENCHMARKS.md: host cost of one combine_ call)


def check(out, ref, dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = max(r.abs().max().item() for r in ref if r.numel())
    err = max((o.double() - r.double()).abs().max().item() for o, r in zip(out, ref) if o.numel())
    if not err <= tol * scale:
        raise SystemExit(f"wrong result: max error {err:.3e} > {tol:.0e} x {scale:.3e}")


def run_workload(name, dtype, paths, reps, ref_reps, floor_bw, rows, cold=False):
    shapes, groups = WORKLOADS[name]()
    out, a, b = make_inputs(shapes, dtype, seed=len(rows))
    n = sum(x.numel() for x in a)
    floor = 5 * n * a[0].element_size() / floor_bw
    ref_out = [torch.empty_like(x) for x in a]
    times = {}
    for path in sorted(paths, key=lambda p: p != "torch"):  # the reference first: it checks the others
        target = ref_out if path == "torch" else out
        fn = lambda: mmfast.combine_(target, a, b, groups=groups, backend=path)  # noqa: E731
        fn()
        if path != "torch":
            check(out, ref_out, dtype)
        times[path] = median_time(fn, ref_reps if path == "torch" else reps, cold=cold)
    for path, t in times.items():
        rows.append(
            dict(workload=name, dtype=str(dtype).replace("torch.", ""), path=path, n=n, ms=t * 1e3,
                 vs_ref=times["torch"] / t, vs_floor=t / floor, ns_per_param=t / n * 1e9, floor_ms=floor * 1e3)
        )
    return times, floor


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet18-av fp32 only, fewer repetitions")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--cold", action="store_true", help="read 128 MB before each repetition (cold caches)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = mmfast.backends()
    paths = [b for b in ("cpu", "foreach", "torch") if info[b].available]
    simd = __import__("mmfast._C", fromlist=["x"]).simd_level() if info["cpu"].available else "n/a"
    print(f"# mmfast {mmfast.__version__}, torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, cpu kernels: {simd}")
    if not info["cpu"].available:
        print(f"# cpu backend unavailable: {info['cpu'].reason}")
    bw = copy_bandwidth()
    print(f"# copy bandwidth (read+write) measured now: {bw / 1e9:.1f} GB/s; floor = 5 N itemsize / bandwidth; "
          f"caches {'cold' if args.cold else 'warm'}")
    rows, summary = [], {}
    reps = 7 if args.quick else 15
    plan = [("resnet18-av", torch.float32)]
    if not args.quick:
        plan += [("resnet18-av", torch.bfloat16), ("sweep-1M", torch.float32), ("sweep-11M", torch.float32),
                 ("sweep-45M", torch.float32)]
    for name, dtype in plan:
        times, floor = run_workload(name, dtype, paths, reps, 3, bw, rows, cold=args.cold)
        summary[(name, dtype)] = times
        print(f"# done {name} {dtype}", file=sys.stderr)

    print()
    print("| workload | dtype | path | params | median ms | speed-up vs reference | x memory floor | ns/param |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['dtype']} | {r['path']} | {r['n'] / 1e6:.1f} M | {r['ms']:.2f} | "
              f"{r['vs_ref']:.1f}x | {r['vs_floor']:.2f} | {r['ns_per_param']:.3f} |")
    if "cpu" not in paths:
        return
    host = {n: [sorted(ts)[len(ts) // 2] for ts in host_cost(n)] for n in HOST_SIZES}
    print()
    print("| host cost per call | combine_ (cpu) us | torch._foreach_norm us | ratio |")
    print("|---|---:|---:|---:|")
    for n, (ours, norm) in host.items():
        print(f"| {n} one-element tensors | {ours * 1e6:.0f} | {norm * 1e6:.0f} | {ours / norm:.2f} |")
    t = summary[("resnet18-av", torch.float32)]
    floor_ms = next(r["floor_ms"] for r in rows if r["workload"] == "resnet18-av" and r["dtype"] == "float32")
    checks = [
        ("fused vs reference (resnet18-av fp32)", t["torch"] / t["cpu"], ">=", TARGETS["vs_reference"]),
        ("fused vs best pure PyTorch (foreach)", t["foreach"] / t["cpu"], ">=", TARGETS["vs_foreach"]),
        ("fused / memory floor", t["cpu"] * 1e3 / floor_ms, "<=", TARGETS["vs_floor"]),
    ]
    for n, (ours, norm) in host.items():
        checks.append((f"host: combine_ / foreach_norm, {n} tensors", ours / norm, "<=", TARGETS["host"]))
    sweep = [r for r in rows if r["workload"].startswith("sweep") and r["path"] == "cpu"]
    if sweep:
        # BENCHMARKS.md: no size slower per parameter than 1.2x the largest (smaller sizes
        # may be faster: they fit in cache).
        largest = max(sweep, key=lambda r: r["n"])["ns_per_param"]
        worst = max(r["ns_per_param"] for r in sweep) / largest
        checks.append(("sweep: slowest time per parameter / the largest size's", worst, "<=",
                       TARGETS["sweep_linearity"]))
    print()
    print("| target | measured | goal | met |")
    print("|---|---:|---:|---|")
    for label, value, op, goal in checks:
        ok = value >= goal if op == ">=" else value <= goal
        print(f"| {label} | {value:.2f} | {op} {goal} | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
