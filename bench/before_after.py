"""The fused CPU combine before and after a change, both builds in one process.

    .venv/bin/python bench/before_after.py REV [--rounds N] [--workload W] [--dtype D]

Builds the tree at git revision REV (at -O3, once, cached in build/before-REV/) with the
package, its op namespace and its C++ namespace renamed to mmfast_before, so that it loads
beside the checkout's mmfast; then times the two combines (backend "cpu") and a large copy
in alternating rounds on the same inputs. Interleaving in one process is what makes a
few-percent difference measurable on a shared machine: separate runs of bench/table.py
drift by more than that (the copy bandwidth itself moves 10 % between runs).
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_before(rev: str) -> str:
    """A renamed -O3 build of REV under build/before-REV/; returns the folder to import from."""
    sha = subprocess.run(["git", "rev-parse", "--short=12", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    dest = os.path.join(ROOT, "build", f"before-{sha}")
    if os.path.exists(os.path.join(dest, ".built")):
        return dest
    os.makedirs(dest, exist_ok=True)
    archive = subprocess.run(["git", "archive", sha, "csrc", "setup.py", "pyproject.toml", "README.md", "mmfast",
                              "kernels"], cwd=ROOT, check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(dest)
    os.rename(os.path.join(dest, "mmfast"), os.path.join(dest, "mmfast_before"))
    word = re.compile(r"\bmmfast\b")
    for folder, _, files in os.walk(dest):
        for f in files:
            if f.endswith((".py", ".cpp", ".h", ".cu", ".cuh", ".toml")):
                path = os.path.join(folder, f)
                text = open(path).read()
                open(path, "w").write(word.sub("mmfast_before", text))
    env = dict(os.environ, MMFAST_CUDA="0", MMFAST_CXX_OPT="-O3", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    print(f"# building {sha} as mmfast_before in {dest} (-O3, a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, env=env, check=True)
    open(os.path.join(dest, ".built"), "w").close()
    return dest


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="the git revision to compare against (e.g. a commit before the change)")
    p.add_argument("--rounds", type=int, default=101)
    p.add_argument("--workload", default="resnet18-av")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    args = p.parse_args()
    sys.path.insert(0, build_before(args.rev))
    import torch

    import mmfast
    from workloads import WORKLOADS, interleaved, make_inputs, median

    mmfast_before = importlib.import_module("mmfast_before")  # the renamed build, not a dependency
    dtype = getattr(torch, args.dtype)
    shapes, groups = WORKLOADS[args.workload]()
    out_new, a, b = make_inputs(shapes, dtype, seed=0)
    out_old = [torch.empty_like(x) for x in a]
    n = sum(x.numel() for x in a)
    src = torch.randn(1 << 26)
    dst = torch.empty_like(src)
    fns = {
        "before": lambda: mmfast_before.combine_(out_old, a, b, groups=groups, backend="cpu"),
        "after": lambda: mmfast.combine_(out_new, a, b, groups=groups, backend="cpu"),
        "copy": lambda: dst.copy_(src),
    }
    fns["after"]()  # a first call checks and tables the layout
    scale = max(w.abs().max().item() for w in out_new)
    times = interleaved(fns, args.rounds)
    diff = max((o.double() - w.double()).abs().max().item() for o, w in zip(out_old, out_new)) / scale
    med = {k: median(v) for k, v in times.items()}
    floor = 5 * n * a[0].element_size() / (2 * src.numel() * 4 / med["copy"])
    paired = sorted(t1 / t0 for t1, t0 in zip(times["after"], times["before"]))
    q = lambda f: paired[int(f * (len(paired) - 1))]  # noqa: E731
    print(f"# {args.workload} {args.dtype}, {n / 1e6:.1f} M params, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; outputs differ by {diff:.1e} of the largest")
    print("| build | median ms | x memory floor |")
    print("|---|---:|---:|")
    for k in ("before", "after"):
        print(f"| {k} ({args.rev if k == 'before' else 'checkout'}) | {med[k] * 1e3:.2f} | {med[k] / floor:.3f} |")
    print(f"after / before: {med['after'] / med['before']:.3f} (medians); per round {q(0.5):.3f} "
          f"(quartiles {q(0.25):.3f} to {q(0.75):.3f})")


if __name__ == "__main__":
    main()
