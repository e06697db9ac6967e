"""GPU benchmark of the combine (BENCHMARKS.md, "On a GPU"): every backend, CUDA events.

    .venv/bin/python bench/gpu.py

Needs a CUDA device (exits 0 with a message otherwise). Reports each backend's
median time, the fraction of the device's copy bandwidth it reaches on the
memory floor (5·N·itemsize bytes; target 80 %), kernel launches per call, host
time per call (the Python call without waiting for the GPU) next to one
``torch._foreach_norm`` over the same list, and whether the combine can be captured
in a CUDA graph and replayed with the same result.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmfast  # noqa: E402
from workloads import WORKLOADS, make_inputs  # noqa: E402


def cuda_time(fn, reps=20, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / cuda_time(lambda: dst.copy_(src))


def launches(fn) -> int:
    """CUDA kernels one call launches (memsets included)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def host_time(fn, reps=50) -> float:
    """Median host time of a call (the GPU is not waited for; synced between calls)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def graph_capturable(backend, out, a, b, groups) -> bool:
    """Captures one combine in a CUDA graph, replays it, compares with eager."""
    ref = [torch.empty_like(x) for x in out]
    mmfast.combine_(ref, a, b, groups=groups, backend=backend)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside capture: builds and caches the chunk tables
            mmfast.combine_(out, a, b, groups=groups, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            mmfast.combine_(out, a, b, groups=groups, backend=backend)
    except Exception as e:  # report, do not hide
        print(f"#   {backend}: capture failed: {type(e).__name__}: {e}")
        return False
    for o in out:
        o.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return all(torch.allclose(o, r, rtol=1e-5, atol=0) for o, r in zip(out, ref))


def main():
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; GPU figures are pending a GPU run")
        return
    info = mmfast.backends()
    paths = [p for p in ("cuda", "triton", "foreach", "torch") if info[p].available]
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| workload | dtype | path | median ms | % of copy bandwidth | launches | host us | host us, one foreach_norm "
          "| CUDA graph |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for name, dtype in [("resnet18-av", torch.float32), ("resnet18-av", torch.bfloat16), ("sweep-1M", torch.float32),
                        ("sweep-11M", torch.float32), ("sweep-45M", torch.float32)]:
        shapes, groups = WORKLOADS[name]()
        out, a, b = make_inputs(shapes, dtype, seed=0)
        out, a, b = ([x.cuda() for x in ts] for ts in (out, a, b))
        ref = [torch.empty_like(x) for x in a]
        mmfast.combine_(ref, a, b, groups=groups, backend="torch")
        floor = 5 * sum(x.numel() for x in a) * a[0].element_size() / bw
        for path in paths:
            mmfast.combine_(out, a, b, groups=groups, backend=path)
            scale = max(r.abs().max().item() for r in ref)
            err = max((o.float() - r.float()).abs().max().item() for o, r in zip(out, ref))
            assert err <= (1e-4 if dtype == torch.float32 else 2e-2) * scale, (path, err)
            fn = lambda: mmfast.combine_(out, a, b, groups=groups, backend=path)  # noqa: E731
            t = cuda_time(fn)
            n_launch = launches(fn)
            host, host_norm = host_time(fn), host_time(lambda: torch._foreach_norm(a))
            capt = graph_capturable(path, out, a, b, groups) if path in ("cuda", "triton") else "-"
            print(f"| {name} | {str(dtype)[6:]} | {path} | {t * 1e3:.3f} | {100 * floor / t:.0f} % | {n_launch} | "
                  f"{host * 1e6:.0f} | {host_norm * 1e6:.0f} | {capt} |", flush=True)


if __name__ == "__main__":
    main()
