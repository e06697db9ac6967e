"""pytest-benchmark suite of the step workload: published loops vs mmfast helpers.

    .venv/bin/python -m pytest bench/test_bench_step.py --benchmark-only

`bench/step.py` prints the same comparison as one table, with peak memory.
"""
import pytest

from step import check_equal, setup


@pytest.mark.parametrize("variant", ["published", "mmfast"])
@pytest.mark.parametrize("method", ["mmpareto", "dgl"])
def test_step(benchmark, method, variant):
    check_equal(method)  # a fast wrong answer is a failure
    fn, _ = setup(method, variant)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
