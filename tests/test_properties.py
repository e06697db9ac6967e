"""Properties of the maths itself (torchjd style), checked on every fast backend."""
import pytest
import torch

import mmfast
from helpers import make_grads, poisoned_like

SHAPES = [(40,), (7, 3), (129,)]


def combine(a, b, backend, **kw):
    out = poisoned_like(a)
    stats = mmfast.combine_(out, a, b, backend=backend, **kw)
    return out, stats


def test_no_conflict_is_gamma_times_sum(backend):
    a, b = make_grads(SHAPES, torch.float64, seed=1, mix=2.0)
    out, stats = combine(a, b, backend, gamma=1.5)
    assert not stats.conflict.item() and stats.w_mm.item() == 0.5
    for o, x, y in zip(out, a, b):
        torch.testing.assert_close(o, 1.5 * (x + y))


@pytest.mark.parametrize("c", [1e-8, 3.0, 1e8])
def test_scale_linear(backend, c):
    a, b = make_grads(SHAPES, torch.float64, seed=2)
    out, _ = combine(a, b, backend)
    out_c, _ = combine([c * x for x in a], [c * x for x in b], backend)
    for o, oc in zip(out, out_c):
        torch.testing.assert_close(oc, c * o, rtol=1e-9, atol=0)


def test_tensor_order_does_not_matter(backend):
    a, b = make_grads(SHAPES, torch.float64, seed=3)
    out, stats = combine(a, b, backend)
    perm = [2, 0, 1]
    out_p, stats_p = combine([a[i] for i in perm], [b[i] for i in perm], backend)
    for j, i in enumerate(perm):
        torch.testing.assert_close(out_p[j], out[i])
    torch.testing.assert_close(stats_p.w_mm, stats.w_mm)


def test_conflict_direction_does_not_oppose_either_gradient(backend):
    # The min-norm combination of two conflicting gradients has a non-negative dot
    # product with both (the Pareto property the method relies on).
    a, b = make_grads(SHAPES, torch.float64, seed=4, mix=-0.6)
    out, stats = combine(a, b, backend)
    assert stats.conflict.item()
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])
    fa, fb = flat(a), flat(b)
    w = stats.w_mm.item()
    if 0.001 < w < 0.999:
        # Per-tensor rescaling keeps each tensor's direction, so check tensor by tensor.
        for o, x, y in zip(out, a, b):
            n = w * x + (1 - w) * y
            assert torch.dot(o.reshape(-1), n.reshape(-1)) >= 0
        d = w * fa + (1 - w) * fb
        assert torch.dot(d, fa) >= -1e-9 * fa.norm() * d.norm()
        assert torch.dot(d, fb) >= -1e-9 * fb.norm() * d.norm()


def test_rescaled_norm_at_least_plain_sum(backend):
    a, b = make_grads(SHAPES, torch.float64, seed=5, mix=-0.5)
    out, _ = combine(a, b, backend, gamma=1.0)
    for o, x, y in zip(out, a, b):
        assert o.norm() >= (x + y).norm() * (1 - 1e-12)


def test_dgl_roles(backend):
    a, b = make_grads(SHAPES, torch.float64, seed=6)
    out, stats = combine(a, b, backend, method="dgl", groups=[0, -1, -1], fusion=[False, True, False], alpha=4.0)
    torch.testing.assert_close(out[0], 4.0 * b[0])
    torch.testing.assert_close(out[1], a[1])
    torch.testing.assert_close(out[2], a[2] + 4.0 * b[2])
    assert stats.w_mm.item() == 0.0 and stats.w_uni.item() == 4.0


def test_dgl_drops_non_finite_discarded_gradient(backend):
    # An encoder never sees the multimodal gradient, even a NaN one (reference: None).
    a, b = make_grads(SHAPES, torch.float64, seed=7)
    a[0][0] = float("nan")
    out, stats = combine(a, b, backend, method="dgl", groups=[0, -1, -1], fusion=[False, True, False])
    assert torch.isfinite(out[0]).all()
    assert not stats.all_finite.item()
