"""GPU suite (skipped without a CUDA device): see bench/gpu.py for the table."""
import pytest
import torch

import mmfast
from gpu import graph_capturable
from workloads import WORKLOADS, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU figures pending")
PATHS = [p for p in ("cuda", "triton", "foreach") if mmfast.backends()[p].available]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("workload", ["resnet18-av", "sweep-45M"])
def test_combine_gpu(benchmark, workload, path):
    shapes, groups = WORKLOADS[workload]()
    out, a, b = ([x.cuda() for x in ts] for ts in make_inputs(shapes, torch.float32, seed=0))

    def run():
        mmfast.combine_(out, a, b, groups=groups, backend=path)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("path", [p for p in PATHS if p != "foreach"])
def test_capturable_in_cuda_graph(path):
    shapes, groups = WORKLOADS["resnet18-av"]()
    out, a, b = ([x.cuda() for x in ts] for ts in make_inputs(shapes, torch.float32, seed=1))
    assert graph_capturable(path, out, a, b, groups)
