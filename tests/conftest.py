import os
import sys

# The repository root, for testbed/ (the shared models, not installed). Appended: an installed
# mmfast (make sdist-check) still comes before the checkout's.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Triton runs here only in its interpreter, which must be chosen before the first
# `import triton`. Decide from the driver, without importing torch.cuda state early.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

import mmfast

COMPILED = [name for name in ("cpu", "cuda", "triton") if mmfast.backends()[name].available]
FAST_BACKENDS = COMPILED + ["foreach"]


def pytest_report_header(config):
    lines = ["mmfast backends: " + ", ".join(f"{k}={'yes' if v.available else 'no'}" for k, v in mmfast.backends().items())]
    if mmfast.backends()["cpu"].available:
        from mmfast.ops._backends import _C

        lines.append(f"mmfast cpu kernels: {_C.simd_level()}, torch threads: {torch.get_num_threads()}")
    return lines


@pytest.fixture(params=FAST_BACKENDS)
def backend(request):
    return request.param
