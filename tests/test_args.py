"""Bad input gets a clear error naming the argument, on every backend."""
import subprocess
import sys

import pytest
import torch

import mmfast

ALL = [name for name, info in mmfast.backends().items() if info.available]


def good(n=2):
    return [torch.zeros(3) for _ in range(n)], [torch.ones(3) for _ in range(n)], [torch.ones(3) for _ in range(n)]


CASES = {
    "length": (lambda o, a, b: (o, a[:1], b), {}, ValueError, "grads_mm: expected 2 tensors"),
    "shape": (lambda o, a, b: (o, [a[0], torch.ones(4)], b), {}, ValueError, r"grads_mm\[1\]: expected shape"),
    "dtype": (lambda o, a, b: (o, a, [b[0], b[1].double()]), {}, TypeError, r"grads_uni\[1\]: expected dtype"),
    "int_dtype": (lambda o, a, b: ([torch.zeros(3, dtype=torch.int32)] * 2, a, b), {}, TypeError, r"out\[0\]: expected a floating"),
    "device": (lambda o, a, b: (o, [a[0], a[1].to("meta")], b), {}, ValueError, r"grads_mm\[1\]: expected device"),
    "non_contiguous": (lambda o, a, b: (o, [a[0], torch.ones(3, 2)[:, 0]], b), {}, ValueError, r"grads_mm\[1\]: expected a contiguous"),
    "not_tensor": (lambda o, a, b: (o, [a[0], 3.0], b), {}, TypeError, r"grads_mm\[1\]: expected a tensor"),
    "not_list": (lambda o, a, b: (o, {"x": a[0]}, b), {}, TypeError, "grads_mm: expected a tensor or a list"),
    "empty": (lambda o, a, b: ([], [], []), {}, ValueError, "out: expected at least one tensor"),
    "method": (lambda o, a, b: (o, a, b), {"method": "pareto"}, ValueError, "method: expected one of"),
    "groups_length": (lambda o, a, b: (o, a, b), {"groups": [0]}, ValueError, "groups: expected 2 entries"),
    "groups_type": (lambda o, a, b: (o, a, b), {"groups": [0, 0.5]}, TypeError, r"groups\[1\]: expected an int"),
    "groups_value": (lambda o, a, b: (o, a, b), {"groups": [0, -2]}, ValueError, r"groups\[1\]: expected a group id"),
    "groups_tensor": (lambda o, a, b: (o, a, b), {"groups": torch.zeros(2)}, TypeError, "groups: expected a list"),
    "fusion_length": (lambda o, a, b: (o, a, b), {"method": "dgl", "fusion": [True]}, ValueError, "fusion: expected 2 entries"),
    "fusion_type": (lambda o, a, b: (o, a, b), {"method": "dgl", "fusion": [True, 1]}, TypeError, r"fusion\[1\]: expected a bool"),
    "fusion_method": (lambda o, a, b: (o, a, b), {"fusion": [True, False]}, ValueError, "fusion: only used by method='dgl'"),
    "gamma": (lambda o, a, b: (o, a, b), {"gamma": -1.0}, ValueError, "gamma: expected a finite positive"),
    "gamma_tensor": (lambda o, a, b: (o, a, b), {"gamma": torch.tensor(1.5)}, TypeError, "gamma: expected a Python number"),
    "alpha_nan": (lambda o, a, b: (o, a, b), {"alpha": float("nan")}, ValueError, "alpha: expected a finite"),
    "max_norm": (lambda o, a, b: (o, a, b), {"max_norm": 0.0}, ValueError, "max_norm: expected a finite positive"),
    "backend": (lambda o, a, b: (o, a, b), {"backend": "gpu"}, ValueError, "backend: expected one of"),
}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, backend):
    build, kw, exc, msg = CASES[case]
    out, a, b = build(*good())
    kw = {"backend": backend, **kw}
    with pytest.raises(exc, match=msg):
        mmfast.combine_(out, a, b, **kw)


def test_partial_overlap_rejected():
    buf = torch.zeros(10)
    with pytest.raises(ValueError, match=r"out\[0\]: overlaps grads_mm\[0\]"):
        mmfast.combine_(buf[1:6], buf[0:5], torch.ones(5))


def test_unavailable_backend_says_why():
    missing = [n for n, info in mmfast.backends().items() if not info.available]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=f"backend='{missing[0]}' is not available: .+"):
        mmfast.combine_(*good(), backend=missing[0])


def test_cpu_backend_rejects_other_devices():
    if not mmfast.backends()["cpu"].available:
        pytest.skip("cpu backend not built")
    t = [torch.zeros(3, device="meta")]
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        mmfast.combine_(t, t, t, backend="cpu")


@pytest.mark.skipif(not mmfast.backends()["cpu"].available, reason="cpu backend not built")
@pytest.mark.parametrize(
    "args, exc, msg",
    [
        (lambda o, a, b: (o, a[:1], b, [0, 0], [], "mmpareto"), ValueError, "grads_mm: expected 2 tensors"),
        (lambda o, a, b: (o, [a[0], torch.ones(4)], b, [0, 0], [], "mmpareto"), ValueError, r"grads_mm\[1\]: expected shape"),
        (lambda o, a, b: (o, a, [b[0], b[1].half()], [0, 0], [], "sum"), TypeError, r"grads_uni\[1\]: expected dtype"),
        (lambda o, a, b: (o, [a[0], torch.ones(3, 2)[:, 0]], b, [0, 0], [], "dgl"), ValueError, "contiguous"),
        (lambda o, a, b: (o, a, b, [0], [], "mmpareto"), ValueError, "groups: expected 2 entries"),
        (lambda o, a, b: (o, a, b, [0, -3], [], "mmpareto"), ValueError, r"groups\[1\]"),
        (lambda o, a, b: (o, a, b, [0, 0], [1], "dgl"), ValueError, "fusion: expected 2 entries"),
        (lambda o, a, b: (o, a, b, [0, 0], [], "nope"), ValueError, "method: expected"),
        # No tensor, no dispatch key: the dispatcher itself refuses, cleanly.
        (lambda o, a, b: ([], [], [], [], [], "sum"), NotImplementedError, "mmfast::combine_"),
    ],
)
def test_operator_checks_its_arguments(args, exc, msg):
    """The C++ operator, called directly, raises a Python exception (never crashes)."""
    out, a, b, groups, fusion, method = args(*good())
    with pytest.raises(exc, match=msg):
        torch.ops.mmfast.combine_(out, a, b, groups, fusion, method, 1.5, 1.0, None)


def test_backends_report():
    info = mmfast.backends()
    assert set(info) == {"cpu", "cuda", "triton", "foreach", "torch"}
    for name, rec in info.items():
        assert isinstance(rec.available, bool)
        assert (rec.reason == "") == rec.available, name
    assert info["torch"].available and info["foreach"].available


def test_import_without_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['mmfast._C'] = None\n"  # makes `from . import _C` fail
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import mmfast, torch\n"
        "    import mmfast.ops._backends\n"
        "msgs = [str(x.message) for x in w if 'mmfast' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'mmfast._C' in msgs[0], msgs\n"
        "info = mmfast.backends()\n"
        "assert not info['cpu'].available and 'mmfast._C' in info['cpu'].reason\n"
        "a = [torch.randn(5)]; b = [torch.randn(5)]; o = [torch.empty(5)]\n"
        "s = mmfast.combine_(o, a, b)\n"
        "ref = [torch.empty(5)]; mmfast.combine_(ref, a, b, backend='torch')\n"
        "assert torch.allclose(o[0], ref[0])\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
