"""The workloads of BENCHMARKS.md, built from the project's own model code."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # testbed (appended: an installed mmfast still wins)
from testbed.models import ResNet18Trunk  # noqa: E402


def resnet18_shapes(in_channels: int) -> list:
    return [tuple(p.shape) for p in ResNet18Trunk(in_channels).parameters()]


def resnet18_av():
    """Two groups (audio: 1-channel ResNet-18 trunk, visual: 3-channel): shapes, groups."""
    audio, visual = resnet18_shapes(1), resnet18_shapes(3)
    return audio + visual, [0] * len(audio) + [1] * len(visual)


def sweep(n_params: int):
    """One group of about ``n_params`` parameters in ResNet-18-sized tensors."""
    trunk = resnet18_shapes(3)
    shapes, total, i = [], 0, 0
    while total < n_params:
        s = trunk[i % len(trunk)]
        n = 1
        for d in s:
            n *= d
        if total + n > n_params:  # last tensor takes the remainder
            s, n = (n_params - total,), n_params - total
        shapes.append(s)
        total += n
        i += 1
    return shapes, [0] * len(shapes)


WORKLOADS = {
    "resnet18-av": resnet18_av,
    "sweep-1M": lambda: sweep(1_000_000),
    "sweep-11M": lambda: sweep(11_000_000),
    "sweep-45M": lambda: sweep(45_000_000),
}


def make_inputs(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    b = [(torch.randn(s, generator=gen) - 0.3 * x.float()).to(dtype) for s, x in zip(shapes, a)]  # conflicting
    out = [torch.empty_like(x) for x in a]
    return out, a, b


_FLUSH = None


def flush_caches() -> None:
    """Reads 128 MB so no workload starts with its inputs in the caches (L3 here: 32 MB):
    every size is timed streaming from memory, so the sweep compares like with like.
    Reading, not writing: dirty lines would cost the next timed call their write-back."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(1 << 25)
    _FLUSH.sum()


def median_time(fn, reps: int, warmup: int = 1, cold: bool = False) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cold:
            flush_caches()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def interleaved(fns: dict, rounds: int) -> dict:
    """Seconds of each call, per round: ``{name: [t_round0, ...]}``. Every round calls each
    function once, in an order that reverses from round to round, so a drift of the shared
    machine reaches all of them alike (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for k in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def median(ts: list) -> float:
    return sorted(ts)[len(ts) // 2]


def host_cost(n: int, rounds: int = 31, reps: int = 5) -> tuple:
    """Host time (seconds) of one ``combine_`` call on the cpu backend and of one
    ``torch._foreach_norm`` over the same ``n`` one-element tensors (BENCHMARKS.md), as two
    lists with one median of ``reps`` calls per round, the rounds alternating between the
    two. The layout is checked on the first call; later calls only fingerprint it."""
    import mmfast

    a = [torch.randn(1) for _ in range(n)]
    b = [torch.randn(1) for _ in range(n)]
    out = [torch.empty(1) for _ in range(n)]
    groups = [i % 2 for i in range(n)]
    ours = lambda: mmfast.combine_(out, a, b, groups=groups, backend="cpu")  # noqa: E731
    norm = lambda: torch._foreach_norm(a)  # noqa: E731
    ours(), norm()
    t_ours, t_norm = [], []
    for _ in range(rounds):
        t_ours.append(median_time(ours, reps, warmup=0))
        t_norm.append(median_time(norm, reps, warmup=0))
    return t_ours, t_norm


def copy_bandwidth(n_bytes: int = 1 << 28, reps: int = 15) -> float:
    """Bytes per second of a large ``dst.copy_(src)``, counting read plus write."""
    src = torch.randn(n_bytes // 4)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), reps, warmup=2)
    return 2 * n_bytes / t


def peak_rss_mb(body: str) -> float:
    """Peak resident memory (MB) of a fresh Python process running ``body`` with bench/ on
    its path. VmHWM, not ru_maxrss: a forked child inherits its parent's ru_maxrss."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r})\n{body}\n"
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.split()[-1]) / 1024
