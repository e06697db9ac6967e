"""combine_ inside torch.compile(fullgraph=True): the operator and its fake kernel."""
import pytest
import torch

import mmfast
from helpers import make_grads

pytestmark = pytest.mark.skipif(not mmfast.backends()["cpu"].available, reason="cpu backend not built")


@pytest.mark.parametrize("method", ["mmpareto", "dgl"])
@pytest.mark.parametrize("in_place", [False, True])
def test_fullgraph_matches_eager(method, in_place):
    shapes, groups = [(33,), (8, 4), (5,)], [0, 1, -1]
    fusion = [False, False, True] if method == "dgl" else None

    def step(out, a, b):
        stats = mmfast.combine_(out, a, b, method=method, groups=groups, fusion=fusion, max_norm=1.0, backend="cpu")
        return stats.w_mm * 2, stats.total_norm, stats.all_finite

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = make_grads(shapes, torch.float32, seed=1)
    a2, b2 = [x.clone() for x in a], [x.clone() for x in b]
    out_e = a if in_place else [torch.empty_like(x) for x in a]
    out_c = a2 if in_place else [torch.empty_like(x) for x in a2]
    eager = step(out_e, a, b)
    comp = compiled(out_c, a2, b2)
    for x, y in zip(out_e, out_c):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for x, y in zip(eager, comp):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_operator_passes_opcheck():
    a, b = make_grads([(16,), (3,)], torch.float32, seed=2)
    out = [torch.empty_like(x) for x in a]
    torch.library.opcheck(
        torch.ops.mmfast.combine_.default,
        (out, a, b, [0, -1], [0, 0], "mmpareto", 1.5, 1.0, 2.0),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
