"""pytest-benchmark suite of the combine (BENCHMARKS.md): every path on every workload.

    .venv/bin/python -m pytest bench --benchmark-only            # everything
    .venv/bin/python -m pytest bench -k "resnet18 and float32"   # a slice

`bench/table.py` prints the same comparisons as one table with ratios.
"""
import pytest
import torch

import mmfast
from workloads import WORKLOADS, copy_bandwidth, make_inputs

PATHS = [p for p in ("cpu", "foreach", "torch") if mmfast.backends()[p].available]
CASES = [("resnet18-av", torch.float32), ("resnet18-av", torch.bfloat16), ("resnet18-av", torch.float16),
         ("sweep-1M", torch.float32), ("sweep-11M", torch.float32), ("sweep-45M", torch.float32)]


@pytest.fixture(scope="module")
def floor_bandwidth():
    return copy_bandwidth()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("workload, dtype", CASES, ids=[f"{w}-{str(d)[6:]}" for w, d in CASES])
def test_combine(benchmark, floor_bandwidth, workload, dtype, path):
    if path == "torch" and workload == "sweep-45M":
        pytest.skip("the reference takes tens of seconds per call here; bench/table.py times it")
    shapes, groups = WORKLOADS[workload]()
    out, a, b = make_inputs(shapes, dtype, seed=0)
    ref = [torch.empty_like(x) for x in a]
    mmfast.combine_(ref, a, b, groups=groups, backend="torch")
    mmfast.combine_(out, a, b, groups=groups, backend=path)  # a fast wrong answer is a failure
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = max(r.abs().max().item() for r in ref)
    assert max((o.double() - r.double()).abs().max().item() for o, r in zip(out, ref)) <= tol * scale
    n = sum(x.numel() for x in a)
    benchmark.extra_info.update(params=n, floor_s=5 * n * a[0].element_size() / floor_bandwidth)
    rounds = 3 if path == "torch" else 15
    benchmark.pedantic(mmfast.combine_, args=(out, a, b), kwargs=dict(groups=groups, backend=path),
                       rounds=rounds, warmup_rounds=1)


def test_copy_floor(benchmark):
    src = torch.randn(1 << 26)
    dst = torch.empty_like(src)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=15, warmup_rounds=2)
