"""pytest-benchmark suite for K objectives: mmfast.aggregate_ vs concatenate-Gram-solve.

    .venv/bin/python -m pytest bench/test_bench_multi.py --benchmark-only

`bench/multi.py` prints the same comparison as one table, with peak memory.
"""
import pytest
import torch

from multi import inputs, run


@pytest.mark.parametrize("path", ["concat", "mmfast"])
@pytest.mark.parametrize("K", [2, 4, 8])
def test_aggregate(benchmark, K, path):
    out, grads = inputs(K)
    ref = [torch.empty_like(o) for o in out]
    run("concat", ref, grads, "upgrad")
    run("mmfast", out, grads, "upgrad")
    scale = max(r.abs().max().item() for r in ref)
    assert max((o - r).abs().max().item() for o, r in zip(out, ref)) <= 1e-4 * scale  # checked before timing
    benchmark.pedantic(run, args=(path, out, grads, "upgrad"), rounds=5, warmup_rounds=1)
