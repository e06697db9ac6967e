"""The CPU loops are built once per x86 instruction set (csrc/cpu/isa.h) and the best one
the CPU has runs; MMFAST_CPU_ISA picks a lower one. Each build is checked here against
the fp64 reference, in a fresh process (the choice is made once, at import)."""
import os
import subprocess
import sys

import pytest
import torch

import mmfast

pytestmark = pytest.mark.skipif(not mmfast.backends()["cpu"].available, reason="cpu backend not built")
HERE = os.path.dirname(os.path.abspath(__file__))


def _levels():
    if not mmfast.backends()["cpu"].available:
        return []
    from mmfast.ops._backends import _C

    best = _C.simd_level().split()[0]
    return {"avx512": ["avx512", "avx2", "baseline"], "avx2": ["avx2", "baseline"]}.get(best, ["baseline"])


def _run(code: str, isa: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MMFAST_CPU_ISA=isa, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=600)


# Every dtype and method on sizes that straddle the vectors, blocks and chunks; non-finite
# values (each build reads finiteness off its own sums for fp32/bf16/fp16: kernels_impl.h);
# the K-objective Gram at an unrolled K (3) and at the runtime-K path (9).
WORKER = r"""
import torch, mmfast
from mmfast.ops._backends import _C
from helpers import assert_close_to_reference, assert_stats_close, make_grads, poisoned_like, reference64
from test_combine import LAYOUTS, _fusion

print(_C.simd_level())
dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
for dtype in dtypes:
    for layout in ("one_element", "odd", "with_empty", "chunk_edges", "resnet_like"):
        shapes, groups = LAYOUTS[layout]
        for method in ("mmpareto", "dgl", "sum"):
            a, b = make_grads(shapes, dtype, seed=3, mix=-0.4)
            kw = dict(method=method, groups=groups, fusion=_fusion(groups, method), alpha=3.0, gamma=1.5)
            ref, ref_stats = reference64(a, b, **kw)
            out = poisoned_like(a)
            stats = mmfast.combine_(out, a, b, backend="cpu", **kw)
            assert_close_to_reference(out, ref, dtype)
            assert_stats_close(stats, ref_stats, rtol=1e-5 if dtype != torch.float64 else 1e-10, dtype=dtype)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for method in ("mmpareto", "dgl", "sum"):
            a, b = make_grads([(100,), (50,), (40,)], dtype, seed=8)
            b[0][17] = bad
            kw = dict(method=method, groups=[0, 1, -1], fusion=[False, False, True] if method == "dgl" else None)
            out = poisoned_like(a)
            stats = mmfast.combine_(out, a, b, backend="cpu", **kw)
            ref, ref_stats = reference64(a, b, **kw)
            assert not stats.all_finite.item(), (dtype, bad, method)
            for o, r in zip(out, ref):
                assert torch.equal(torch.isnan(o), torch.isnan(r)) and torch.equal(torch.isinf(o), torch.isinf(r))
        for K in (3, 9):
            g = [make_grads([(37,), (1025,)], dtype, seed=10 + k)[0] for k in range(K)]
            flat = [g[k][t] for t in range(2) for k in range(K)]
            G, finite = torch.ops.mmfast.gram_k(flat, K)
            for t in range(2):
                J = torch.stack([g[k][t].double().reshape(-1) for k in range(K)])
                torch.testing.assert_close(G[t], J @ J.T, rtol=1e-12, atol=1e-12)
            assert finite.item()
            g[K - 1][1][5] = bad
            flat = [g[k][t] for t in range(2) for k in range(K)]
            assert not torch.ops.mmfast.gram_k(flat, K)[1].item(), (dtype, K, bad)
    big = [torch.full((33,), torch.finfo(dtype).max / 2, dtype=dtype)]
    assert mmfast.combine_([torch.empty_like(big[0])], big, big, backend="cpu").all_finite.item(), dtype
print("OK")
"""


@pytest.mark.parametrize("isa", _levels())
def test_each_build_matches_the_reference(isa):
    res = _run(WORKER, isa)
    assert res.returncode == 0, res.stderr[-3000:]
    level, ok = res.stdout.split("\n")[:2]
    assert level.startswith("sse2" if isa == "baseline" else isa), level
    assert ok == "OK"


def test_bad_value_fails_the_import_with_a_clear_message():
    res = _run("import mmfast.ops._backends as b; print(b._C.simd_level())", "sse9")
    assert res.returncode != 0
    assert "MMFAST_CPU_ISA=sse9: expected one of avx512, avx2, baseline" in res.stderr, res.stderr[-2000:]


@pytest.mark.skipif("avx512" in _levels(), reason="this CPU has every level")
def test_a_level_the_cpu_lacks_is_refused():
    res = _run("import mmfast.ops._backends as b; print(b._C.simd_level())", "avx512")
    assert res.returncode != 0 and "MMFAST_CPU_ISA=avx512: this CPU" in res.stderr, res.stderr[-2000:]
