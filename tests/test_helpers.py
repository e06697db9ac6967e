"""mmfast.MMPareto and mmfast.DGL against the published loops, over several SGD steps."""
import copy

import pytest
import torch
from torch import nn

import mmfast
from published import SeedAV, SeedDGL, per_loss_grads, published_dgl_step, published_mmpareto_step

ce = nn.CrossEntropyLoss()


def data(seed, n=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def assert_models_close(m1, m2, rtol=1e-5):
    s1, s2 = m1.state_dict(), m2.state_dict()
    for k in s1:
        if s1[k].is_floating_point():
            scale = s1[k].abs().max().item() + 1e-12
            assert (s1[k] - s2[k]).abs().max().item() <= rtol * scale, k


def assert_grads_close(m1, m2, rtol=1e-5):
    ps = list(m1.named_parameters())
    scale = max(p.grad.abs().max().item() for _, p in ps if p.grad is not None)
    for (n, p), q in zip(ps, m2.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max().item() <= rtol * scale + 1e-12, n


def expected_grads(model, losses, to=None):
    """(names, the MMPareto gradients) from the per-loss gradients, by the reference
    (optionally upcast to ``to`` first)."""
    g_mm, g_a, g_v = per_loss_grads(model, losses)
    names = [n for n, _ in model.named_parameters()]
    groups = [0 if n.startswith("audio") else 1 if n.startswith("visual") else -1 for n in names]
    b = [ga if g == 0 else gv if g == 1 else ga + gv for g, ga, gv in zip(groups, g_a, g_v)]
    if to is not None:
        g_mm, b = [x.to(to) for x in g_mm], [x.to(to) for x in b]
    expected = [torch.empty_like(x) for x in g_mm]
    mmfast.combine_(expected, g_mm, b, groups=groups, backend="torch")
    return names, expected


def mmp_for(model, **kw):
    return mmfast.MMPareto({"audio": model.audio_net, "visual": model.visual_net}, **kw)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_mmpareto_matches_published_over_sgd_steps(backend, set_to_none):
    torch.manual_seed(0)
    ref = SeedAV()
    ours = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    mmp = mmp_for(ours, backend=backend)
    conflicts = set()
    for step in range(5):
        x_a, x_v, y = data(step)
        published_mmpareto_step(ref, opt_ref, x_a, x_v, y, step=False)
        opt.zero_grad(set_to_none=set_to_none)
        before = ours.audio_net[0].weight.grad
        out, out_a, out_v = ours(x_a, x_v)
        stats = mmp.backward(ce(out, y), {"audio": ce(out_a, y), "visual": ce(out_v, y)})
        assert_grads_close(ref, ours)
        if before is not None:  # as a plain backward: the update is added into the existing .grad
            assert ours.audio_net[0].weight.grad is before
        conflicts.update(stats.conflict.tolist())
        opt_ref.step()
        opt.step()
        assert_models_close(ref, ours)
    assert stats.as_dict()["cos"].keys() == {"audio", "visual"}


def test_mmpareto_differs_from_plain_sum():
    torch.manual_seed(1)
    model = SeedAV()
    x_a, x_v, y = data(0)
    out, out_a, out_v = model(x_a, x_v)
    (ce(out, y) + ce(out_a, y) + ce(out_v, y)).backward()
    plain = [p.grad.clone() for p in model.audio_net.parameters()]
    model.zero_grad(set_to_none=True)
    out, out_a, out_v = model(x_a, x_v)
    mmp_for(model).backward(ce(out, y), {"audio": ce(out_a, y), "visual": ce(out_v, y)})
    assert any(not torch.allclose(p.grad, q) for p, q in zip(model.audio_net.parameters(), plain))


@pytest.mark.parametrize("max_norm", [None, 0.05, 40.0])
@pytest.mark.parametrize("detach", [True, False])
def test_dgl_matches_published_over_sgd_steps(backend, max_norm, detach):
    torch.manual_seed(2)
    ref = SeedDGL(detach=True)  # the published model detaches; ours may have forgotten
    ours = SeedDGL(detach=detach)
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    dgl = mmfast.DGL({"audio": ours.audio_net, "visual": ours.visual_net}, fusion=ours.fusion_module,
                     alpha=4.0, max_norm=max_norm, backend=backend)
    for step in range(5):
        x_a, x_v, y = data(10 + step)
        total = published_dgl_step(ref, x_a, x_v, y, alpha=4.0, max_norm=max_norm if max_norm else float("inf"))
        opt.zero_grad()
        out, out_a, out_v = ours(x_a, x_v)
        stats = dgl.backward(ce(out, y), {"audio": ce(out_a, y), "visual": ce(out_v, y)})
        assert stats.total_norm.item() == pytest.approx(total.item(), rel=1e-5)
        if max_norm == 0.05:
            assert stats.clip_coef.item() < 1
        assert_grads_close(ref, ours)
        opt_ref.step()
        opt.step()
        assert_models_close(ref, ours)


class Leaky(SeedAV):
    """The audio head also sees visual features: loss_a reaches the visual encoder."""

    def forward(self, x_a, x_v):
        f_a, f_v = self.audio_net(x_a), self.visual_net(x_v)
        out = self.fusion_module(torch.cat([f_a, f_v], 1))
        return out, self.head_audio(f_a + 0.5 * f_v), self.head_visual(f_v)


def test_assumption_check_names_loss_and_group():
    model = Leaky()
    x_a, x_v, y = data(0)
    out, out_a, out_v = model(x_a, x_v)
    with pytest.raises(ValueError, match=r"unimodal loss of group 'audio' reaches group 'visual' \(parameter visual\."):
        mmp_for(model).backward(ce(out, y), {"audio": ce(out_a, y), "visual": ce(out_v, y)})


def test_per_loss_backward_fallback_is_exact():
    torch.manual_seed(3)
    model = Leaky()
    x_a, x_v, y = data(1)
    out, out_a, out_v = model(x_a, x_v)
    losses = [ce(out, y), ce(out_a, y), ce(out_v, y)]
    names, expected = expected_grads(model, losses)
    mmp_for(model, per_loss_backward=True).backward(losses[0], {"audio": losses[1], "visual": losses[2]})
    for n, p, e in zip(names, model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7, msg=n)


def test_unused_parameter_keeps_grad_none():
    model = SeedAV()
    model.audio_net.register_parameter("unused", nn.Parameter(torch.randn(3)))  # in the group, never used
    x_a, x_v, y = data(2)
    mmp = mmp_for(model)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out, out_a, out_v = model(x_a, x_v)
        mmp.backward(ce(out, y), {"audio": ce(out_a, y), "visual": ce(out_v, y)})
        assert model.audio_net.unused.grad is None
        assert model.audio_net[0].weight.grad is not None


def test_bad_arguments():
    model = SeedAV()
    x_a, x_v, y = data(3)
    out, out_a, out_v = model(x_a, x_v)
    mmp = mmp_for(model)
    with pytest.raises(ValueError, match="losses: unknown group 'text'"):
        mmp.backward(ce(out, y), {"audio": ce(out_a, y), "visual": ce(out_v, y), "text": ce(out_v, y)})
    with pytest.raises(ValueError, match="losses: missing the unimodal loss of group 'visual'"):
        mmp.backward(ce(out, y), {"audio": ce(out_a, y)})
    with pytest.raises(ValueError, match=r"losses\['audio'\]: expected a scalar loss"):
        mmp.backward(ce(out, y), {"audio": nn.functional.cross_entropy(out_a, y, reduction="none"), "visual": ce(out_v, y)})
    with pytest.raises(ValueError, match="loss_mm: expected a scalar loss"):
        mmp.backward(out, {"audio": ce(out_a, y), "visual": ce(out_v, y)})
    with pytest.raises(ValueError, match="in two groups, 'audio' and 'visual'"):
        mmfast.MMPareto({"audio": model.audio_net, "visual": list(model.visual_net.parameters()) + [model.audio_net[0].weight]})
    with pytest.raises(TypeError, match=r"groups\['audio'\]: expected an nn.Module or an iterable"):
        mmfast.MMPareto({"audio": 3, "visual": model.visual_net})
    with pytest.raises(ValueError, match=r"groups\[.audio.\]: has no parameters"):
        mmfast.MMPareto({"audio": [], "visual": model.visual_net})
    with pytest.raises(ValueError, match="loss_mm: does not require grad"):
        mmp.backward(ce(out, y).detach(), {"audio": ce(out_a, y), "visual": ce(out_v, y)})


def test_gradient_scaler_order():
    """scale -> backward (combine on scaled grads) -> unscale_ equals the unscaled step:
    the MMPareto combine is scale-equivariant (weights and norm ratios cancel the scale)."""
    torch.manual_seed(4)
    m1 = SeedAV()
    m2 = copy.deepcopy(m1)
    x_a, x_v, y = data(4)
    out, out_a, out_v = m1(x_a, x_v)
    mmp_for(m1).backward(ce(out, y), {"audio": ce(out_a, y), "visual": ce(out_v, y)})
    opt = torch.optim.SGD(m2.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    out, out_a, out_v = m2(x_a, x_v)
    s = scaler.scale
    mmp_for(m2).backward(s(ce(out, y)), {"audio": s(ce(out_a, y)), "visual": s(ce(out_v, y))})
    scaler.unscale_(opt)
    assert_grads_close(m1, m2, rtol=1e-5)


def test_user_clipping_after_backward():
    model = SeedAV()
    x_a, x_v, y = data(5)
    out, out_a, out_v = model(x_a, x_v)
    mmp_for(model).backward(ce(out, y), {"audio": ce(out_a, y), "visual": ce(out_v, y)})
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    total = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
    assert total.item() == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_model(backend, dtype):
    torch.manual_seed(5)
    model = SeedAV().to(dtype)
    x_a, x_v, y = data(6)
    x_a, x_v = x_a.to(dtype), x_v.to(dtype)
    out, out_a, out_v = model(x_a, x_v)
    losses = [ce(out.float(), y), ce(out_a.float(), y), ce(out_v.float(), y)]
    names, expected = expected_grads(model, losses, to=torch.float64)
    mmp_for(model, backend=backend).backward(losses[0], {"audio": losses[1], "visual": losses[2]})
    scale = max(e.abs().max().item() for e in expected)
    for n, p, e in zip(names, model.parameters(), expected):
        assert p.grad.dtype == dtype
        # Half-precision sums in autograd differ from the fp64 sum by a few ulps.
        assert (p.grad.double() - e).abs().max().item() <= 2e-2 * scale, n


def test_dgl_bad_arguments():
    model = SeedDGL()
    with pytest.raises(ValueError, match="in two groups"):
        mmfast.DGL({"audio": model.audio_net, "visual": model.visual_net}, fusion=model.audio_net)


def test_autocast_forward():
    """torch.autocast (bf16 compute, fp32 parameters): the helper sees fp32 gradients and
    combines them exactly as the reference does from the same per-loss gradients."""
    torch.manual_seed(6)
    model = SeedAV()
    x_a, x_v, y = data(7)

    def losses():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, out_a, out_v = model(x_a, x_v)
        return [ce(out.float(), y), ce(out_a.float(), y), ce(out_v.float(), y)]

    names, expected = expected_grads(model, losses())
    ls = losses()
    mmp_for(model).backward(ls[0], {"audio": ls[1], "visual": ls[2]})
    for n, p, e in zip(names, model.parameters(), expected):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6, msg=n)
