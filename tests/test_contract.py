"""One argument contract for combine_, aggregate_ and clip_grad_norm_ (issue 13): group
ids, aliasing by memory across every index, inference tensors, autograd version counters,
empty groups; the same result or the same message on every backend."""
from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.ops import _args
from mmfast.ops._backends import _C

BACKENDS = [name for name in ("torch", "foreach", "cpu", "triton") if mmfast.backends()[name].available]


def grads(n=3, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(size, generator=g) for _ in range(n)]
    b = [torch.randn(size, generator=g) - 0.5 * x for x in a]
    return a, b


def message(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return None


def same_error_everywhere(call, expect_type, expect_text):
    """``call(backend)`` raises the same exception and message on every backend."""
    got = {b: message(lambda: call(b)) for b in BACKENDS}
    first = got[BACKENDS[0]]
    assert first is not None, "no error raised"
    assert first[0] == expect_type.__name__ and expect_text in first[1], first
    for b, m in got.items():
        assert m == first, (b, m, first)


# --- group ids --------------------------------------------------------------------------

GROUP_CASES = [
    ([-2, 0, 0], ValueError, "groups[0]: expected a group id >= 0, or -1 for outside every group, got -2"),
    ([True, 0, 0], TypeError, "groups[0]: expected an int, got bool"),
    ([0, 0.0, 0], TypeError, "groups[1]: expected an int, got float"),
    ([0, 0], ValueError, "groups: expected 3 entries (one per tensor), got 2"),
    (torch.zeros(3, dtype=torch.long), TypeError, "groups: expected a list of ints (one per tensor), got Tensor"),
]


@pytest.mark.parametrize("groups, exc, text", GROUP_CASES, ids=["-2", "bool", "float", "length", "tensor"])
@pytest.mark.parametrize("op", ["combine_", "aggregate_", "clip_grad_norm_"])
def test_group_ids(op, groups, exc, text):
    a, b = grads()

    def call(backend):
        out = [torch.empty_like(x) for x in a]
        if op == "combine_":
            mmfast.combine_(out, a, b, groups=groups, backend=backend)
        elif op == "aggregate_":
            mmfast.aggregate_(out, [a, b], weighting="mgda", groups=groups, backend=backend)
        else:
            mmfast.clip_grad_norm_(a, 1.0, groups=groups, backend=backend)

    same_error_everywhere(call, exc, text)


def test_single_bad_group_is_an_error_not_an_index_error():
    a, b = grads(1)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"groups\[0\]: expected a group id"):
            mmfast.aggregate_([torch.empty(5)], [a, b], groups=[-2], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_groups_are_neutral(backend):
    # Ids 0-4 and 6-8 are unused: zero Gram, cosine 0, no conflict, weights 0.5 / 0.5.
    a, b = grads()
    out = [torch.empty_like(x) for x in a]
    stats = mmfast.combine_(out, a, b, groups=[5, 5, 9], backend=backend)
    assert stats.gram.shape == (10, 3)
    empty = [g for g in range(10) if g not in (5, 9)]
    assert torch.equal(stats.gram[empty], torch.zeros(8, 3, dtype=torch.float64))
    assert not stats.conflict[empty].any()
    assert torch.equal(stats.w_mm[empty], torch.full((8,), 0.5, dtype=torch.float64))
    assert torch.equal(stats.w_uni[empty], torch.full((8,), 0.5, dtype=torch.float64))
    assert torch.equal(stats.cos[empty], torch.zeros(8, dtype=torch.float64))
    ref = [torch.empty_like(x) for x in a]
    ref_stats = mmfast.combine_(ref, a, b, groups=[0, 0, 1], backend="torch")
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    torch.testing.assert_close(stats.gram[[5, 9]], ref_stats.gram)
    # A group that has members but all-zero gradients is a conflict (docs/semantics.md).
    zeros = [torch.zeros(5)]
    assert mmfast.combine_([torch.empty(5)], zeros, zeros, groups=[1], backend=backend).conflict.tolist() == [False, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_empty_groups(backend):
    g = [torch.ones(4), torch.ones(9)]
    stats = mmfast.clip_grad_norm_(g, None, groups=[2, 2], backend=backend)
    assert stats.group_sq.tolist() == [0.0, 0.0, 13.0]


# --- aliasing by memory -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alias", ["grads_mm", "grads_uni"])
@pytest.mark.parametrize("method", ["mmpareto", "dgl", "sum"])
def test_out_is_an_input_through_a_view(backend, alias, method):
    # Same memory as grads_*[i], another tensor object: in place, the right result.
    a, b = grads(3, 12)
    kw = dict(method=method, groups=[0, 0, -1], fusion=[False, False, True] if method == "dgl" else None, alpha=2.0)
    ref = [torch.empty_like(x) for x in a]
    mmfast.combine_(ref, a, b, backend="torch", **kw)
    src = a if alias == "grads_mm" else b
    out = [x.view(3, 4).view(12) for x in src]
    assert all(o is not x and o.data_ptr() == x.data_ptr() for o, x in zip(out, src))
    mmfast.combine_(out, a, b, backend=backend, **kw)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)


OVERLAP_CASES = {
    # out[0] is grads_mm[1]'s memory: writing out[0] would change out[1]'s input.
    "across_indices": (lambda a, b, o: ([a[1], o[1], o[2]], a, b), "out[0]: overlaps grads_mm[1] in memory"),
    "out_out": (lambda a, b, o: ([o[0], o[0], o[2]], a, b), "out[1]: overlaps out[0] in memory"),
}


@pytest.mark.parametrize("case", ["across_indices", "out_out"])
def test_overlap_across_indices_is_refused_everywhere(case):
    build, text = OVERLAP_CASES[case]

    def call(backend):
        a, b = grads()
        o = [torch.empty_like(x) for x in a]
        mmfast.combine_(*build(a, b, o), backend=backend)

    same_error_everywhere(call, ValueError, text)


def test_partial_overlap_within_a_buffer_is_refused_everywhere():
    def call(backend):
        buf = torch.randn(12)
        mmfast.combine_([buf[1:6]], [buf[0:5]], [torch.ones(5)], backend=backend)

    same_error_everywhere(call, ValueError, "out[0]: overlaps grads_mm[0] in memory")


def test_aggregate_and_clip_overlap_everywhere():
    def agg(backend):
        a, b = grads()
        mmfast.aggregate_([b[1], a[1], a[2]], [a, b], weighting="mgda", backend=backend)

    same_error_everywhere(agg, ValueError, "out[0]: overlaps grads[1][1] in memory")

    def clip(backend):
        buf = torch.randn(10)
        mmfast.clip_grad_norm_([buf[:6], buf[4:]], 1.0, backend=backend)

    same_error_everywhere(clip, ValueError, "grads[1]: overlaps grads[0] in memory")


# --- inference tensors and autograd version counters ------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_tensors(backend):
    a, b = grads()
    with torch.inference_mode():
        out = [torch.empty(5) for _ in range(3)]
    with pytest.raises(ValueError, match=r"out\[0\]: is an inference tensor, which cannot be written outside"):
        mmfast.combine_(out, a, b, backend=backend)
    with torch.inference_mode():  # inside inference mode, as torch's in-place ops allow
        mmfast.combine_(out, a, b, backend=backend)
    ref = [torch.empty(5) for _ in range(3)]
    mmfast.combine_(ref, a, b, backend="torch")
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    with pytest.raises(ValueError, match=r"grads\[0\]: is an inference tensor"):
        mmfast.clip_grad_norm_(out, 1.0, backend=backend)
    # An inference tensor that is only read is fine.
    mmfast.combine_([torch.empty(5) for _ in range(3)], out, b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["combine_", "clip_grad_norm_", "aggregate_"])
def test_writes_move_version_counters(backend, op):
    # A tensor saved for backward and then overwritten by the op: autograd must notice.
    a, b = grads()
    w = torch.randn(5, requires_grad=True)
    out = [torch.randn(5) for _ in range(3)]
    loss = (w * out[0]).sum()  # saves out[0] for backward
    before = [o._version for o in out]
    if op == "combine_":
        mmfast.combine_(out, a, b, backend=backend)
    elif op == "aggregate_":
        mmfast.aggregate_(out, [a, b], weighting="mgda", backend=backend)
    else:
        out[0].mul_(1e3)  # make sure the clip bites
        loss = (w * out[0]).sum()
        before = [o._version for o in out]
        mmfast.clip_grad_norm_(out, 1e-3, backend=backend)
    assert all(o._version > v for o, v in zip(out, before)), [o._version for o in out]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- the same messages from C++ and from Python -------------------------------------------

def _cases():
    z = lambda *s, **kw: torch.zeros(*s, **kw)  # noqa: E731
    buf = torch.zeros(20)
    return {
        "empty": ([[], [], []], [], None),
        "length": ([[z(3), z(3)], [z(3)], [z(3), z(3)]], [0, 0], None),
        "int_dtype": ([[z(3).int()], [z(3)], [z(3)]], [0], None),
        "dtype": ([[z(3)], [z(3)], [z(3).double()]], [0], None),
        "device": ([[z(3), z(3)], [z(3), z(3, device="meta")], [z(3), z(3)]], [0, 0], None),
        "shape": ([[z(3), z(4)], [z(3), z(2, 2)], [z(3), z(4)]], [0, 0], None),
        "shape_0d": ([[z(())], [z(1)], [z(())]], [0], None),
        "contiguous": ([[z(3)], [z(3, 2)[:, 0]], [z(3)]], [0], None),
        "overlap": ([[buf[:5], buf[5:10]], [buf[5:10], z(5)], [z(5), z(5)]], [0, 0], None),
        "out_out": ([[buf[:5], buf[2:7]], [z(5), z(5)], [z(5), z(5)]], [0, 0], None),
        "partial": ([[buf[:5]], [buf[1:6]], [z(5)]], [0], None),
        "group": ([[z(3), z(3)], [z(3), z(3)], [z(3), z(3)]], [0, -3], None),
        "fusion": ([[z(3)], [z(3)], [z(3)]], [0], [True, False]),
    }


@pytest.mark.skipif(_C is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("case", ["empty", "length", "int_dtype", "dtype", "device", "shape", "shape_0d", "contiguous", "overlap", "out_out", "partial", "group", "fusion"])
def test_cpp_and_python_checks_word_errors_alike(case):
    lists, groups, fusion = _cases()[case]
    names = ["out", "grads_mm", "grads_uni"]
    cpp = message(lambda: _C.check_args(names, lists, 1, groups, fusion or []))
    py = message(lambda: _args._check_py(names, lists, 1, groups, fusion))
    assert cpp is not None and cpp == py, (cpp, py)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_a_tensor_is_worded_on_every_backend(backend):
    a, b = grads(2)
    with pytest.raises(TypeError, match=r"grads_uni\[1\]: expected a tensor, got float"):
        mmfast.combine_([torch.empty(5), torch.empty(5)], a, [b[0], 1.0], backend=backend)
    with pytest.raises(TypeError, match=r"grads\[1\]: expected a tensor, got NoneType"):
        mmfast.clip_grad_norm_([a[0], None], 1.0, backend=backend)
