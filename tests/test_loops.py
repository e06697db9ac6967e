"""The training helpers in the loops users write: accumulation (both forms), graphs that
change from step to step, freezing and unfreezing, missing modalities, models that
change under the helper, torch.compile, copies. Each against what the definitions give
on that step's per-loss gradients (the reference combine of docs/semantics.md), which
tests/test_published.py ties to the published loops.
"""
import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mmfast
from published import SeedAV, SeedDGL, published_mmpareto_step

ce = nn.CrossEntropyLoss()
ALPHA = 4.0


def data(seed, n=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g),
            torch.randint(0, classes, (n,), generator=g))


class TinyAV(nn.Module):
    """No BatchNorm, so k micro-batches of a batch equal the batch (global-batch form)."""

    def __init__(self, dgl=False):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 8))
        self.visual_net = nn.Sequential(nn.Flatten(), nn.Linear(192, 12), nn.Tanh(), nn.Linear(12, 8))
        self.fusion_module = nn.Linear(16, 4)
        self.head_audio = nn.Linear(8, 4)
        self.head_visual = nn.Linear(8, 4)
        self.dgl = dgl

    def forward(self, x_a, x_v):
        f_a, f_v = self.audio_net(x_a), self.visual_net(x_v)
        if self.dgl:  # DGL's shared fusion classifier
            f = self.fusion_module
            return (f(torch.cat([f_a, f_v], 1).detach()), f(torch.cat([f_a, torch.zeros_like(f_v)], 1)),
                    f(torch.cat([torch.zeros_like(f_a), f_v], 1)))
        return self.fusion_module(torch.cat([f_a, f_v], 1)), self.head_audio(f_a), self.head_visual(f_v)


class Branchy(SeedAV):
    """From ``use_extra = True`` on, an extra head on the audio features joins L_mm and an
    extra audio layer joins the audio encoder: both first reached after step 1."""

    def __init__(self):
        super().__init__()
        self.extra_head = nn.Linear(8, 4)
        self.audio_extra = nn.Linear(8, 8)
        self.use_extra = False

    def forward(self, x_a, x_v):
        f_a, f_v = self.audio_net(x_a), self.visual_net(x_v)
        if self.use_extra:
            f_a = f_a + self.audio_extra(f_a)
        out = self.fusion_module(torch.cat((f_a, f_v), 1))
        if self.use_extra:
            out = out + self.extra_head(f_a)
        return out, self.head_audio(f_a), self.head_visual(f_v)


def group_specs(model):
    groups = {"audio": [model.audio_net], "visual": [model.visual_net]}
    if hasattr(model, "audio_extra"):
        groups["audio"].append(model.audio_extra)
    return groups


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def group_of(model):
    """id(param) -> 0 (audio), 1 (visual) for the trainable group parameters."""
    out = {}
    for g, mods in enumerate(group_specs(model).values()):
        for m in mods:
            for p in m.parameters():
                if p.requires_grad:
                    out[id(p)] = g
    return out


def per_loss(model, losses):
    ps = [p for _, p in trainable(model)]
    res = []
    for loss in losses:
        if not loss.requires_grad:
            res.append([None] * len(ps))
            continue
        res.append(list(torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True)))
    return ps, res


def expected_mmpareto(model, losses, gamma=1.5):
    """{id(param): gradient or None}: docs/semantics.md on this step's per-loss gradients."""
    ps, (g_mm, g_a, g_v) = per_loss(model, losses)
    gof = group_of(model)
    z = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
    idx = [i for i, p in enumerate(ps) if id(p) in gof and (g_mm[i] is not None or (g_a, g_v)[gof[id(p)]][i] is not None)]
    a = [z(g_mm[i], ps[i]) for i in idx]
    b = [z((g_a, g_v)[gof[id(ps[i])]][i], ps[i]) for i in idx]
    gids = sorted({gof[id(ps[i])] for i in idx})
    out = [torch.empty_like(x) for x in a]
    if idx:
        mmfast.combine_(out, a, b, groups=[gids.index(gof[id(ps[i])]) for i in idx], gamma=gamma, backend="torch")
    res = {}
    for i, p in enumerate(ps):
        if id(p) in gof:
            res[id(p)] = out[idx.index(i)] if i in idx else None
        else:
            parts = [g for g in (g_mm[i], g_a[i], g_v[i]) if g is not None]
            res[id(p)] = sum(parts[1:], parts[0]) if parts else None
    return res


def expected_dgl(model, losses, alpha=ALPHA):
    """{id(param): DGL gradient before clipping}."""
    ps, (g_mm, g_a, g_v) = per_loss(model, losses)
    gof = group_of(model)
    fusion = {id(p) for p in model.fusion_module.parameters()}
    res = {}
    for i, p in enumerate(ps):
        uni = [g for g in (g_a[i], g_v[i]) if g is not None]
        uni = alpha * sum(uni[1:], uni[0]) if uni else None
        if id(p) in gof:
            res[id(p)] = uni
        elif id(p) in fusion:
            res[id(p)] = g_mm[i]
        else:
            parts = [g for g in (g_mm[i], uni) if g is not None]
            res[id(p)] = sum(parts[1:], parts[0]) if parts else None
    return res


def add_into(total, step):
    for k, v in step.items():
        if v is not None:
            total[k] = v.clone() if total.get(k) is None else total[k] + v
        else:
            total.setdefault(k, None)
    return total


def clip(grads, max_norm):
    gs = [g for g in grads.values() if g is not None]
    total = torch.stack([g.double().norm() for g in gs]).norm()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    return {k: (None if g is None else g * coef) for k, g in grads.items()}


def assert_grads(model, want, what, rtol=2e-5):
    scale = max(float(w.abs().max()) for w in want.values() if w is not None)
    for n, p in model.named_parameters():
        w = want.get(id(p))
        if w is None:
            assert p.grad is None, f"{what}: {n} should have no gradient"
            continue
        assert p.grad is not None, f"{what}: {n} got no gradient"
        # fp32 sums of the same per-loss gradients in another order: a few ulps of the scale.
        err = float((p.grad.double() - w.double()).abs().max())
        assert err <= rtol * scale, f"{what}: {n} max|diff| {err:.3e} (scale {scale:.3e})"


def mmp_for(model, **kw):
    return mmfast.MMPareto({k: list(v) if len(v) > 1 else v[0] for k, v in group_specs(model).items()}, **kw)


def dgl_for(model, **kw):
    return mmfast.DGL({"audio": model.audio_net, "visual": model.visual_net}, fusion=model.fusion_module,
                      alpha=ALPHA, **kw)


def losses_of(model, batch):
    out, out_a, out_v = model(*batch[:2])
    y = batch[2]
    return [ce(out, y), ce(out_a, y), ce(out_v, y)]


# ------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("set_to_none", [True, False])
def test_mmpareto_accumulates_per_micro_batch(backend, set_to_none):
    torch.manual_seed(0)
    model = SeedAV()
    mmp = mmp_for(model, backend=backend)
    for step in range(2):
        model.zero_grad(set_to_none=set_to_none)
        want = {}
        for i in range(3):
            batch = data(10 * step + i)
            add_into(want, expected_mmpareto(model, losses_of(model, batch)))
            ls = losses_of(model, batch)
            mmp.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
        if not set_to_none:  # zero_grad(False) leaves zeros where a plain backward adds nothing
            want = {k: (torch.zeros_like(p) if v is None else v) for k, v in want.items()
                    for p in model.parameters() if id(p) == k}
        assert_grads(model, want, f"step {step}, 3 micro-batches")


@pytest.mark.parametrize("max_norm", [None, 0.05, 40.0])
def test_dgl_accumulates_and_clips_once(backend, max_norm):
    torch.manual_seed(1)
    model = SeedDGL()
    dgl = dgl_for(model, max_norm=max_norm, backend=backend)
    model.zero_grad()
    want = {}
    for i in range(3):
        batch = data(20 + i)
        add_into(want, expected_dgl(model, losses_of(model, batch)))
        ls = losses_of(model, batch)
        if i < 2:
            with dgl.no_sync():
                assert dgl.backward(ls[0], {"audio": ls[1], "visual": ls[2]}) is None
        else:
            stats = dgl.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
    if max_norm is not None:
        want = clip(want, max_norm)
    if max_norm == 0.05:
        assert float(stats.clip_coef) < 0.5  # the clip bites, once, on the accumulated sum
    assert_grads(model, want, f"DGL accumulated, max_norm={max_norm}")


@pytest.mark.parametrize("helper", ["mmpareto", "multi"])
def test_global_batch_form_equals_one_big_batch(backend, helper):
    """combine=False k-1 times, then combine=True: the combine of the summed per-objective
    gradients, i.e. one batch k times as large (the losses being means, scaled by 1/k)."""
    torch.manual_seed(2)
    model = TinyAV()
    big = copy.deepcopy(model)
    x_a, x_v, y = data(3, n=12)
    if helper == "mmpareto":
        h = mmfast.MMPareto({"audio": model.audio_net, "visual": model.visual_net}, backend=backend)
    else:
        h = mmfast.MultiObjective({"audio": model.audio_net, "visual": model.visual_net}, 3, weighting="upgrad",
                                  backend=backend)
        h_big = mmfast.MultiObjective({"audio": big.audio_net, "visual": big.visual_net}, 3, weighting="upgrad",
                                      backend="torch")
    for step in range(2):
        model.zero_grad()
        for i, sl in enumerate((slice(0, 4), slice(4, 8), slice(8, 12))):
            ls = [loss / 3 for loss in losses_of(model, (x_a[sl], x_v[sl], y[sl]))]
            if helper == "mmpareto":
                r = h.backward(ls[0], {"audio": ls[1], "visual": ls[2]}, combine=i == 2)
            else:
                r = h.backward(ls, combine=i == 2)
            assert (r is None) == (i < 2)
        big.zero_grad()
        if helper == "mmpareto":
            published_mmpareto_step(big, torch.optim.SGD(big.parameters(), lr=0.1), x_a, x_v, y)
        else:
            h_big.backward(losses_of(big, (x_a, x_v, y)))
        want = {id(p): q.grad for p, q in zip(model.parameters(), big.parameters())}
        assert_grads(model, want, f"step {step}: 3 micro-batches vs one batch")
        x_a, x_v = x_a.flip(0), x_v.flip(0)


def test_global_batch_form_dropped_by_zero_grad():
    """An accumulation abandoned with zero_grad (either form) does not leak into the next."""
    for set_to_none in (True, False):
        torch.manual_seed(3)
        model = TinyAV()
        mmp = mmfast.MMPareto({"audio": model.audio_net, "visual": model.visual_net})
        ls = losses_of(model, data(4))
        mmp.backward(ls[0], {"audio": ls[1], "visual": ls[2]}, combine=False)
        model.zero_grad(set_to_none=set_to_none)
        batch = data(5)
        want = expected_mmpareto(model, losses_of(model, batch))
        ls = losses_of(model, batch)
        mmp.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
        if not set_to_none:
            want = {id(p): (torch.zeros_like(p) if want[id(p)] is None else want[id(p)]) for p in model.parameters()}
        assert_grads(model, want, f"after an abandoned accumulation (set_to_none={set_to_none})")


def test_no_zero_fill_and_grads_handed_over():
    """After zero_grad(set_to_none=True) the helper fills nothing with zeros (autograd hands
    its gradient tensors over) and makes no copy of the group gradients."""
    torch.manual_seed(4)
    model = SeedAV()
    mmp = mmp_for(model, backend="cpu" if mmfast.backends()["cpu"].available else None)
    ls = losses_of(model, data(6))

    class Count(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model.zero_grad(set_to_none=True)
    with Count() as c:
        mmp.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
    assert not [o for o in c.ops if "fill_" in o or "zero_" in o or "copy_" in o], c.ops


# ----------------------------------------------------------- graphs that change


@pytest.mark.parametrize("mode", ["summed", "per_loss", "dgl"])
def test_parameters_reached_later_get_their_gradient(backend, mode):
    torch.manual_seed(5)
    model = Branchy()
    if mode == "dgl":
        h = mmfast.DGL({"audio": [*model.audio_net.parameters(), *model.audio_extra.parameters()],
                        "visual": model.visual_net}, fusion=model.fusion_module, alpha=ALPHA, max_norm=None,
                       backend=backend)
    else:
        h = mmp_for(model, backend=backend, per_loss_backward=mode == "per_loss")
    for step in range(3):
        model.use_extra = step >= 1
        model.zero_grad()
        batch = data(30 + step)
        want = (expected_dgl if mode == "dgl" else expected_mmpareto)(model, losses_of(model, batch))
        ls = losses_of(model, batch)
        h.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
        assert_grads(model, want, f"{mode}, step {step}")
        if step >= 1:
            assert model.extra_head.weight.grad is not None and model.audio_extra.weight.grad is not None


def test_disjointness_checked_every_step():
    """A unimodal loss that crosses into another group from step 2 on is caught then."""

    class Crossing(SeedAV):
        cross = False

        def forward(self, x_a, x_v):
            f_a, f_v = self.audio_net(x_a), self.visual_net(x_v)
            out = self.fusion_module(torch.cat((f_a, f_v), 1))
            return out, self.head_audio(f_a + (0.5 * f_v if self.cross else 0)), self.head_visual(f_v)

    model = Crossing()
    mmp = mmp_for(model)
    ls = losses_of(model, data(7))
    mmp.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
    model.cross = True
    ls = losses_of(model, data(8))
    with pytest.raises(ValueError, match="unimodal loss of group 'audio' reaches group 'visual'"):
        mmp.backward(ls[0], {"audio": ls[1], "visual": ls[2]})


# ------------------------------------------------------------------ freezing


@pytest.mark.parametrize("mode", ["mmpareto", "dgl"])
def test_groups_follow_requires_grad(backend, mode):
    torch.manual_seed(6)
    model = SeedAV() if mode == "mmpareto" else SeedDGL()
    first = model.audio_net[0]
    for p in first.parameters():
        p.requires_grad_(False)  # frozen when the helper is built (a pretrained stem)
    h = mmp_for(model, backend=backend) if mode == "mmpareto" else dgl_for(model, max_norm=None, backend=backend)
    expected = expected_mmpareto if mode == "mmpareto" else expected_dgl
    for step, frozen in enumerate([first, None, model.visual_net]):
        for p in model.parameters():
            p.requires_grad_(True)
        if frozen is not None:
            for p in frozen.parameters():
                p.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        batch = data(40 + step)
        want = expected(model, losses_of(model, batch))
        ls = losses_of(model, batch)
        h.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
        assert_grads(model, want, f"{mode} step {step}")
        if frozen is not None:
            assert all(p.grad is None for p in frozen.parameters())
    # unfrozen in step 1: the MMPareto update, not the plain sum
    if mode == "mmpareto":
        assert not bool(torch.isnan(first.weight.grad).any())


# ------------------------------------------------------------ missing modality


@pytest.mark.parametrize("how", ["constant", "skipped"])
@pytest.mark.parametrize("mode", ["mmpareto", "dgl"])
def test_missing_modality(backend, mode, how):
    """A unimodal loss that does not reach its group: b = 0 there, a conflict (the cosine
    of a zero vector is 0), the formulas; no error, no NaN."""
    torch.manual_seed(7)
    model = SeedAV() if mode == "mmpareto" else SeedDGL()
    h = mmp_for(model, backend=backend) if mode == "mmpareto" else dgl_for(model, max_norm=None, backend=backend)
    batch = data(50)

    def with_missing():
        ls = losses_of(model, batch)
        if how == "constant":
            ls[2] = torch.zeros(())
        else:  # the visual encoder is skipped: its head sees zero features
            head = model.head_visual if mode == "mmpareto" else (
                lambda f: model.fusion_module.fc_out(torch.cat([torch.zeros_like(f), f], 1)))
            ls[2] = ce(head(torch.zeros(batch[0].shape[0], 8)), batch[2])
        return ls

    want = (expected_mmpareto if mode == "mmpareto" else expected_dgl)(model, with_missing())
    ls = with_missing()
    stats = h.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
    assert_grads(model, want, f"{mode}, visual loss {how}")
    for p in model.parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all())
    if mode == "mmpareto":
        d = stats.as_dict()
        assert d["conflict"]["visual"] is True and d["BB"]["visual"] == 0.0 and d["w_mm"]["visual"] == 0.001


# ------------------------------------------------------ the model changes under it


def step_grads(model, helper, seed, mode="mmpareto"):
    model.zero_grad(set_to_none=True)
    ls = losses_of(model, data(seed))
    helper.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def same(g1, g2):
    return all((x is None) == (y is None) and (x is None or torch.equal(x, y)) for x, y in zip(g1, g2))


@pytest.mark.parametrize("mode", ["mmpareto", "dgl"])
def test_load_state_dict_assign_and_to(mode):
    torch.manual_seed(8)
    model = SeedAV() if mode == "mmpareto" else SeedDGL()
    other = SeedAV() if mode == "mmpareto" else SeedDGL()
    make = mmp_for if mode == "mmpareto" else (lambda m: dgl_for(m, max_norm=None))
    h = make(model)
    step_grads(model, h, 60)
    model.load_state_dict(other.state_dict(), assign=True)  # new Parameter objects
    model.to(torch.float32)
    assert same(step_grads(model, h, 61), step_grads(model, make(model), 61))


def test_copies_and_pickles_work_or_say_why():
    torch.manual_seed(9)
    model = SeedAV()
    mmp = mmp_for(model)
    m2, h2 = copy.deepcopy((model, mmp))  # the copy's groups are the copied modules
    m3, h3 = pickle.loads(pickle.dumps((model, mmp)))
    g1 = step_grads(model, mmp, 70)
    assert same(step_grads(m2, h2, 70), g1) and same(step_grads(m3, h3, 70), g1)
    only_model = copy.deepcopy(model)  # no hooks on the model: a copy of it trains plainly
    ls = losses_of(only_model, data(71))
    sum(ls).backward()
    assert all(p.grad is not None for p in only_model.parameters())


def test_helper_of_another_model_is_an_error():
    model = SeedAV()
    mmp = mmp_for(model)
    copy_ = copy.deepcopy(model)
    ls = losses_of(copy_, data(72))
    with pytest.raises(ValueError, match="reach none of the parameters of the groups.*another model"):
        mmp.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
    dgl = dgl_for(SeedDGL())
    m = SeedDGL()
    ls = losses_of(m, data(73))
    with pytest.raises(ValueError, match="another model"):
        dgl.backward(ls[0], {"audio": ls[1], "visual": ls[2]})


def test_freezing_after_building_dgl():
    model = SeedDGL()
    dgl = dgl_for(model)
    for p in model.audio_net.parameters():
        p.requires_grad_(False)
    step_grads(model, dgl, 74)
    assert all(p.grad is None for p in model.audio_net.parameters())


def test_torch_compile_gives_no_false_alarm():
    torch.manual_seed(10)
    model = SeedAV()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")  # AOT autograd: one opaque backward node, as inductor
    mmp = mmp_for(model)
    batch = data(75)
    want = expected_mmpareto(eager, losses_of(eager, batch))
    ls = losses_of(compiled, batch)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mmp.backward(ls[0], {"audio": ls[1], "visual": ls[2]})
    assert any("torch.compile graph" in str(x.message) for x in w)
    want = {id(p): want[id(q)] for p, q in zip(model.parameters(), eager.parameters())}
    assert_grads(model, want, "compiled model")


def test_constructor_arguments_are_checked_at_once():
    model = SeedAV()
    g = {"audio": model.audio_net, "visual": model.visual_net}
    for kw, msg in [({"gamma": -1}, "gamma: expected a finite number > 0"),
                    ({"gamma": float("nan")}, "gamma"),
                    ({"backend": "nosuch"}, "backend: expected one of"),
                    ({"per_loss_backward": "yes"}, "per_loss_backward: expected a bool")]:
        with pytest.raises((ValueError, TypeError), match=msg):
            mmfast.MMPareto(g, **kw)
    for kw, msg in [({"max_norm": -5}, "max_norm: expected a finite number > 0 or None"),
                    ({"alpha": float("inf")}, "alpha"), ({"backend": "nosuch"}, "backend")]:
        with pytest.raises(ValueError, match=msg):
            mmfast.DGL(g, fusion=model.fusion_module, **kw)
    with pytest.raises(ValueError, match="weighting: unknown 'nash'"):
        mmfast.MultiObjective(g, 2, weighting="nash")
    with pytest.raises(ValueError, match="n_objectives"):
        mmfast.MultiObjective(g, 0)
