"""mmfast.combine_ against independent transcriptions of the published loops.

tests/published.py transcribes GeWu-Lab/MMPareto_ICML2024 (code/MMPareto.py,
code/min_norm_solvers.py) and shicaiwei123/ICCV2025-GDL (main_dgl.py,
models/fusion_modules.py) literally. Here every parameter's final gradient from
those loops is compared with what ``mmfast.combine_`` makes of the same per-loss
gradients, on a tiny model and on crafted gradients that force each branch of the
MMPareto weight rule, and over a few SGD steps.

Tolerance (fp32), per parameter tensor t of group G (an encoder, or everything else):

    max|got_t - want_t| <= RTOL * max|want_t| + NOISE * max|want_G|

The first term covers the combine's own arithmetic on t (fp32 storage of values that
mmfast computes from fp64 terms). The second is the rounding the two *backward* passes
leave in every gradient element, which neither side controls: each element is a sum of
n terms (n <= batch * H * W = 4 * 8 * 8 = 256 here), computed in fp32 by whichever
oneDNN / MKL kernel the CPU picks, so it carries an error of about u * sqrt(n) * (the
size of its terms), u = 2**-24, with a constant that depends on the kernel's summation
order. The terms are the gradients flowing through the group, so the group's largest
gradient is their scale. Where a gradient is zero in exact arithmetic (a conv bias that
feeds a BatchNorm) the computed value is nothing *but* this noise, and two CPUs give
different noise: comparing such a tensor with its own maximum compares rounding noise.
NOISE = 64 u (about 3.8e-6) allows sqrt(n) = 16 for the reduction, x2 for the two
independent computations (published loop and mmfast each run their own backward
passes) and x2 for the combine's coefficients (gamma * 2 * max(r, 1) <= 3 * r), which
scale noise and group alike. A wrong combine is off by O(1) of the group scale.
Checked under the default kernels, with ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2, and with 1 thread
(``make test-isa``): the largest error seen was 2 u of the group scale.

Note on the clamps: the published solver is only called when ``cos <= 0``, i.e.
``AB <= 0``. There ``AB >= AA`` can only hold with ``AA = AB = 0`` (the group's
multimodal gradient is all zeros) and ``AB >= BB`` only with ``BB = AB = 0`` (the
unimodal gradient is all zeros). Those are the only ways to reach 0.999 and 0.001;
``b = 3a`` (``AB >= AA``) with a positive cosine takes the equal-weight branch,
which is tested too.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import mmfast
from published import (
    SeedAV,
    SeedDGL,
    published_dgl_step,
    published_mmpareto_combine,
    published_mmpareto_step,
    per_loss_grads,
)

RTOL = 1e-5
NOISE = 64 * 2.0**-24  # backward-pass rounding, relative to the group's scale (see above)
# "cuda" runs everything on the GPU; so does "triton" where a GPU is visible (else it
# runs on CPU tensors, which needs TRITON_INTERPRET=1, set by tests/conftest.py).
BACKENDS = ["torch", "cpu", "foreach", "cuda", "triton"]
N_CLASSES = 4
BATCH = 4


# ------------------------------------------------------------------------ helpers


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    records = mmfast.backends()
    rec = records.get(name)
    if rec is None:
        pytest.skip(f"backend {name!r} is not registered (have {sorted(records)})")
    if not rec.available:
        pytest.skip(f"backend {name!r} unavailable: {rec.reason}")
    return name


def device_of(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def assert_grads_close(got, want, what="grad", rtol=RTOL, groups=None):
    """Per tensor: ``rtol * max|want_t| + NOISE * max|want_G|`` (module docstring).

    ``groups``: one id per tensor (tensors with equal ids share a scale), for gradients
    that the two sides computed with their own backward passes. None: the inputs were
    the same tensors on both sides (crafted gradients, or mmfast's own per-loss
    gradients), so only the combine's fp32 rounding remains: ``2u`` of the call's scale.
    """
    assert len(got) == len(want)
    noise = NOISE if groups is not None else 2 * 2.0**-24
    groups = [0] * len(want) if groups is None else list(groups)
    assert len(groups) == len(want)
    scale = {}
    for g, w in zip(groups, want):
        scale[g] = max(scale.get(g, 0.0), float(w.abs().max()) if w.numel() else 0.0)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.isfinite(w).all(), f"{what}[{i}]: the published value is not finite"
        assert torch.isfinite(g).all(), f"{what}[{i}]: mmfast produced a non-finite value"
        err = float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
        tol = rtol * float(w.abs().max()) + noise * scale[groups[i]] + 1e-30
        assert err <= tol, (f"{what}[{i}]: max|diff| = {err:.3e} > tol {tol:.3e} (max|want| = "
                            f"{float(w.abs().max()):.3e}, group scale {scale[groups[i]]:.3e})")


def assert_not_close(got, want, what):
    """At least one tensor differs by far more than the comparison tolerance."""
    worst = max(float((g.detach() - w.detach()).abs().max()) / (float(w.detach().abs().max()) + 1e-30)
                for g, w in zip(got, want))
    assert worst > 1e-3, f"{what}: expected a real difference, max relative diff is only {worst:.3e}"


def group_of(name: str) -> int:
    top = name.split(".")[0]
    return {"audio_net": 0, "visual_net": 1}.get(top, -1)


def make_inputs(seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x_a = torch.randn(BATCH, 1, 8, 8, generator=g)
    x_v = torch.randn(BATCH, 3, 8, 8, generator=g)
    y = torch.randint(0, N_CLASSES, (BATCH,), generator=g)
    return x_a.to(device), x_v.to(device), y.to(device)


def make_seed_av(seed: int, mode: str = "natural", device="cpu") -> SeedAV:
    torch.manual_seed(seed)
    model = SeedAV(N_CLASSES).to(device)
    with torch.no_grad():
        if mode == "clamps":
            # visual half of the fusion head zero: the visual encoder gets no
            # multimodal gradient (AA = AB = 0 -> 0.999); audio head zero: the audio
            # encoder gets no unimodal gradient (BB = AB = 0 -> 0.001).
            model.fusion_module.weight[:, 8:] = 0
            model.head_audio.weight.zero_()
    return model


def split_uni(names, g_a, g_v):
    """grads_uni for combine_: d loss_m for encoder m, d(loss_a + loss_v) elsewhere."""
    out = []
    for n, ga, gv in zip(names, g_a, g_v):
        grp = group_of(n)
        out.append(ga if grp == 0 else gv if grp == 1 else ga + gv)
    return out


def mmfast_step(model, optimizer, x_a, x_v, y, *, backend, method, inplace="out", step=False, **kw):
    """The same training step, with mmfast.combine_ doing the gradient surgery."""
    criterion = nn.CrossEntropyLoss()
    optimizer.zero_grad()
    out, out_a, out_v = model(x_a, x_v)
    loss_mm, loss_a, loss_v = criterion(out, y), criterion(out_a, y), criterion(out_v, y)
    g_mm, g_a, g_v = per_loss_grads(model, [loss_mm, loss_a, loss_v])
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    a = [g.contiguous() for g in g_mm]
    b = [g.contiguous() for g in split_uni(names, g_a, g_v)]
    groups = [group_of(n) for n in names]
    if method == "dgl":
        kw["fusion"] = [n.split(".")[0] == "fusion_module" for n in names]
    a_copy = [t.clone() for t in a]
    b_copy = [t.clone() for t in b]
    outs = {"mm": a, "uni": b}.get(inplace) or [torch.full_like(t, float("nan")) for t in a]
    stats = mmfast.combine_(outs, a, b, method=method, groups=groups, backend=backend, **kw)
    if inplace != "mm":
        for i, (t, c) in enumerate(zip(a, a_copy)):
            assert torch.equal(t, c), f"combine_ modified grads_mm[{i}] although it is not out"
    if inplace != "uni":
        for i, (t, c) in enumerate(zip(b, b_copy)):
            assert torch.equal(t, c), f"combine_ modified grads_uni[{i}] although it is not out"
    for (_, p), o in zip(named, outs):
        p.grad = o
    if step:
        optimizer.step()
    return stats, {"a": a_copy, "b": b_copy, "names": names, "groups": groups}


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------- MMPareto on the model


def test_natural_model_hits_both_branches():
    """The seeds used below really exercise both the conflict and no-conflict branch."""
    seen = set()
    for seed in (0, 1, 2, 6):
        model = make_seed_av(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        info = published_mmpareto_step(model, opt, *make_inputs(seed))
        seen.add(info["cos_audio"] > 0)
        seen.add(info["cos_visual"] > 0)
    assert seen == {True, False}


@pytest.mark.parametrize("inplace", ["out", "mm", "uni"])
@pytest.mark.parametrize("seed,mode", [(0, "natural"), (1, "natural"), (2, "natural"), (6, "natural"), (3, "clamps")])
def test_mmpareto_model_step(backend, seed, mode, inplace):
    dev = device_of(backend)
    model_pub = make_seed_av(seed, mode, dev)
    model_mmf = copy.deepcopy(model_pub)
    x_a, x_v, y = make_inputs(seed, dev)

    opt_pub = torch.optim.SGD(model_pub.parameters(), lr=0.01)
    info = published_mmpareto_step(model_pub, opt_pub, x_a, x_v, y)
    want = grads_of(model_pub)

    opt_mmf = torch.optim.SGD(model_mmf.parameters(), lr=0.01)
    stats, ctx = mmfast_step(model_mmf, opt_mmf, x_a, x_v, y, backend=backend, method="mmpareto", inplace=inplace)
    got = grads_of(model_mmf)
    assert_grads_close(got, want, f"mmpareto seed={seed} {mode}", groups=ctx["groups"])

    # The weights and the conflict test agree with the published ones.
    w_mm = stats.w_mm.double().cpu()
    w_uni = stats.w_uni.double().cpu()
    for g, (cos, k) in enumerate([(info["cos_audio"], info["audio_k"]), (info["cos_visual"], info["visual_k"])]):
        assert bool(stats.conflict[g]) == (not cos > 0), f"group {g}: conflict flag vs published cos {cos}"
        assert abs(float(w_mm[g]) - k[0]) <= 1e-5, f"group {g}: w_mm {float(w_mm[g])} vs published {k[0]}"
        assert abs(float(w_uni[g]) - (1 - float(w_mm[g]))) <= 1e-12
        assert abs(float(stats.cos[g]) - cos) <= 1e-5, f"group {g}: cos {float(stats.cos[g])} vs published {cos}"
    if mode == "clamps":
        assert float(w_mm[1]) == pytest.approx(0.999) and float(w_mm[0]) == pytest.approx(0.001), w_mm

    # Honesty: encoder gradients are not the plain sum; the rest is exactly the sum.
    plain = [a + b for a, b in zip(ctx["a"], ctx["b"])]
    enc = [i for i, g in enumerate(ctx["groups"]) if g >= 0]
    rest = [i for i, g in enumerate(ctx["groups"]) if g < 0]
    assert_not_close([got[i] for i in enc], [plain[i] for i in enc], "encoder grads vs plain sum")
    assert_grads_close([got[i] for i in rest], [plain[i] for i in rest], "non-encoder grads vs plain sum")


def test_crafted_transcription_matches_loop():
    """published_mmpareto_combine (crafted-gradient path) == the literal loop on a model."""
    for seed, mode in [(0, "natural"), (1, "natural"), (3, "clamps")]:
        model = make_seed_av(seed, mode)
        x_a, x_v, y = make_inputs(seed)
        ref = copy.deepcopy(model)
        published_mmpareto_step(ref, torch.optim.SGD(ref.parameters(), lr=0.01), x_a, x_v, y)
        out, out_a, out_v = model(x_a, x_v)
        ce = nn.CrossEntropyLoss()
        g_mm, g_a, g_v = per_loss_grads(model, [ce(out, y), ce(out_a, y), ce(out_v, y)])
        names = [n for n, _ in model.named_parameters()]
        groups = [group_of(n) for n in names]
        new, _ = published_mmpareto_combine(g_mm, split_uni(names, g_a, g_v), groups)
        assert_grads_close(new, grads_of(ref), f"transcriptions seed={seed}", groups=groups)


# --------------------------------------------------- MMPareto on crafted gradients

SHAPES = [(3, 4), (5,), (2, 3, 2), (7,)]


def _rand(shapes, gen, scale=1.0):
    return [scale * torch.randn(s, generator=gen) for s in shapes]


def _zeros(shapes):
    return [torch.zeros(s) for s in shapes]


def crafted(case: str):
    """(a, b, groups, expected branch per group) for one crafted case."""
    gen = torch.Generator().manual_seed(1234)
    n = len(SHAPES)
    if case == "no_conflict":
        a = _rand(SHAPES, gen)
        b = [x + 0.5 * e for x, e in zip(a, _rand(SHAPES, gen))]
        return a, b, [0] * n, ["half"]
    if case == "no_conflict_ab_ge_aa":  # AB >= AA, but cos > 0: no clamp
        a = _rand(SHAPES, gen)
        b = [3 * x + 0.01 * e for x, e in zip(a, _rand(SHAPES, gen))]
        return a, b, [0] * n, ["half"]
    if case == "no_conflict_ab_ge_bb":  # AB >= BB, but cos > 0: no clamp
        a = _rand(SHAPES, gen)
        b = [0.2 * x + 0.01 * e for x, e in zip(a, _rand(SHAPES, gen))]
        return a, b, [0] * n, ["half"]
    if case == "closed_form":
        a = _rand(SHAPES, gen)
        b = [-0.6 * x + 0.5 * e for x, e in zip(a, _rand(SHAPES, gen))]
        b[1] = -a[1].clone()  # a + b = 0 here: published diff = 0 < 1
        b[2] = 0.3 * a[2].clone()  # same direction: diff > 1 here
        return a, b, [0] * n, ["closed"]
    if case == "orthogonal":  # AB == 0 exactly: cos = 0 is a conflict, closed form
        a = _rand(SHAPES, gen)
        b = _rand(SHAPES, gen, 2.0)
        a[0].zero_(), a[1].zero_()
        b[2].zero_(), b[3].zero_()
        return a, b, [0] * n, ["closed"]
    if case == "clamp_hi":  # a == 0: AB = 0 >= AA = 0 -> 0.999
        a = _zeros(SHAPES)
        b = _rand(SHAPES, gen)
        b[3].zero_()  # a tensor with a = b = 0: published gives 0 (NaN > 1 is False)
        return a, b, [0] * n, ["hi"]
    if case == "clamp_lo":  # b == 0: AB = 0 >= BB = 0 -> 0.001
        a = _rand(SHAPES, gen)
        b = _zeros(SHAPES)
        a[0].zero_()
        return a, b, [0] * n, ["lo"]
    if case == "both_zero":  # AA = AB = BB = 0 -> 0.999, everything 0
        return _zeros(SHAPES), _zeros(SHAPES), [0] * n, ["hi"]
    if case == "mixed":  # four groups, interleaved, plus tensors outside every group
        parts = [crafted(c) for c in ("closed_form", "clamp_lo", "no_conflict", "clamp_hi")]
        a, b, groups = [], [], []
        for t in range(n):
            for g, (pa, pb, _, _) in enumerate(parts):
                a.append(pa[t])
                b.append(pb[t])
                groups.append(g)
            a.append(torch.randn(SHAPES[t], generator=gen))
            b.append(torch.randn(SHAPES[t], generator=gen))
            groups.append(-1)
        return a, b, groups, ["closed", "lo", "half", "hi"]
    raise AssertionError(case)


CASES = ["no_conflict", "no_conflict_ab_ge_aa", "no_conflict_ab_ge_bb", "closed_form",
         "orthogonal", "clamp_hi", "clamp_lo", "both_zero", "mixed"]


@pytest.mark.parametrize("inplace", ["out", "mm", "uni"])
@pytest.mark.parametrize("case", CASES)
def test_mmpareto_crafted(backend, case, inplace):
    dev = device_of(backend)
    a, b, groups, branches = crafted(case)
    a = [t.to(dev) for t in a]
    b = [t.to(dev) for t in b]
    want, info = published_mmpareto_combine(a, b, groups, gamma=1.5)

    a_in = [t.clone() for t in a]
    b_in = [t.clone() for t in b]
    outs = {"mm": a_in, "uni": b_in}.get(inplace) or [torch.full_like(t, float("nan")) for t in a]
    stats = mmfast.combine_(outs, a_in, b_in, method="mmpareto", groups=groups, gamma=1.5, backend=backend)
    assert_grads_close(outs, want, f"crafted {case}")

    G = len(branches)
    assert tuple(stats.gram.shape) == (G, 3) and tuple(stats.w_mm.shape) == (G,)
    assert bool(stats.all_finite)
    for g, branch in enumerate(branches):
        members = [t for t in range(len(a)) if groups[t] == g]
        ac = torch.cat([a[t].reshape(-1) for t in members]).double()
        bc = torch.cat([b[t].reshape(-1) for t in members]).double()
        AA, AB, BB = float(ac @ ac), float(ac @ bc), float(bc @ bc)
        scale = max(AA, BB, 1e-30)
        gram = stats.gram[g].double().cpu().tolist()
        for got_v, want_v, lbl in zip(gram, (AA, AB, BB), ("AA", "AB", "BB")):
            assert abs(got_v - want_v) <= 1e-5 * scale, f"group {g} {lbl}: {got_v} vs {want_v}"
        w = float(stats.w_mm[g])
        k0 = info["k"][g][0]
        # The intended branch was really hit, by the published code and by mmfast.
        if branch == "half":
            assert AB > 0 and info["cos"][g] > 0 and not bool(stats.conflict[g])
            assert w == 0.5 and k0 == 0.5
        else:
            assert AB <= 0 and not info["cos"][g] > 0 and bool(stats.conflict[g])
            if branch == "hi":
                assert AB >= AA and w == pytest.approx(0.999, abs=1e-12) and k0 == pytest.approx(0.999)
            elif branch == "lo":
                assert AB < AA and AB >= BB
                assert w == pytest.approx(0.001, abs=1e-12) and k0 == pytest.approx(0.001)
            else:
                assert AB < AA and AB < BB
                closed = (BB - AB) / (AA + BB - 2 * AB)
                assert 0.001 < closed < 0.999
                assert w == pytest.approx(closed, rel=1e-6), (w, closed)
                assert k0 == pytest.approx(closed, rel=1e-5), (k0, closed)
        assert float(stats.w_uni[g]) == pytest.approx(1 - w, abs=1e-12)

    # Honesty: the combine is not the plain (or gamma-scaled) sum where it should not be.
    members = [t for t in range(len(a)) if groups[t] >= 0]
    plain = [a[t] + b[t] for t in members]
    if case in ("closed_form", "orthogonal", "mixed"):
        assert_not_close([outs[t] for t in members], plain, "combined vs plain sum")
        assert_not_close([outs[t] for t in members], [1.5 * p for p in plain], "combined vs gamma * sum")
    if case == "closed_form":
        diffs = [d for d in info["diff"] if d is not None]
        assert min(diffs) < 1 < max(diffs), diffs  # both rescale branches are exercised
    if case.startswith("no_conflict"):
        assert_grads_close([outs[t] for t in members], [1.5 * p for p in plain], "no conflict = gamma * sum")


def test_crafted_gamma(backend):
    a, b, groups, _ = crafted("mixed")
    a = [t.to(device_of(backend)) for t in a]
    b = [t.to(device_of(backend)) for t in b]
    want, _ = published_mmpareto_combine(a, b, groups, gamma=0.7)
    outs = [torch.empty_like(t) for t in a]
    mmfast.combine_(outs, a, b, method="mmpareto", groups=groups, gamma=0.7, backend=backend)
    assert_grads_close(outs, want, "gamma=0.7")


# ------------------------------------------------------- MMPareto, 5 SGD steps


def _assert_models_equal(m1, m2, what):
    s1, s2 = m1.state_dict(), m2.state_dict()
    keys = [k for k in s1 if s1[k].is_floating_point()]
    assert_grads_close([s2[k] for k in keys], [s1[k] for k in keys], what)


def test_mmpareto_sgd_steps(backend):
    dev = device_of(backend)
    model_pub = make_seed_av(0, device=dev)
    model_mmf = copy.deepcopy(model_pub)
    start = copy.deepcopy(model_pub)
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt_pub = torch.optim.SGD(model_pub.parameters(), **sgd)
    opt_mmf = torch.optim.SGD(model_mmf.parameters(), **sgd)
    conflicts = []
    for step in range(5):
        x_a, x_v, y = make_inputs(100 + step, dev)
        info = published_mmpareto_step(model_pub, opt_pub, x_a, x_v, y, step=True)
        stats, _ = mmfast_step(model_mmf, opt_mmf, x_a, x_v, y, backend=backend, method="mmpareto", step=True)
        conflicts += [info["cos_audio"] <= 0, info["cos_visual"] <= 0]
        assert stats.conflict.cpu().tolist() == conflicts[-2:]
        _assert_models_equal(model_pub, model_mmf, f"after step {step + 1}")
    assert_not_close(list(model_mmf.parameters()), list(start.parameters()), "the models moved")


# ------------------------------------------------------------------------- DGL


def make_seed_dgl(seed: int, detach: bool = True, device="cpu") -> SeedDGL:
    torch.manual_seed(seed)
    return SeedDGL(N_CLASSES, detach=detach).to(device)


@pytest.mark.parametrize("clip", ["inactive", "none", "active"])
@pytest.mark.parametrize("seed", [0, 5])
def test_dgl_model_step(backend, seed, clip):
    alpha = 4.0
    pub_max = {"inactive": 40.0, "none": 40.0, "active": 0.05}[clip]
    mmf_max = {"inactive": 40.0, "none": None, "active": 0.05}[clip]
    dev = device_of(backend)
    model_pub = make_seed_dgl(seed, device=dev)
    model_mmf = copy.deepcopy(model_pub)
    x_a, x_v, y = make_inputs(seed, dev)

    total = published_dgl_step(model_pub, x_a, x_v, y, alpha=alpha, max_norm=pub_max)
    want = grads_of(model_pub)
    opt = torch.optim.SGD(model_mmf.parameters(), lr=0.01)
    stats, ctx = mmfast_step(model_mmf, opt, x_a, x_v, y, backend=backend, method="dgl",
                             alpha=alpha, max_norm=mmf_max)
    got = grads_of(model_mmf)
    assert_grads_close(got, want, f"dgl seed={seed} clip={clip}", groups=ctx["groups"])

    assert float(stats.total_norm) == pytest.approx(float(total), rel=1e-5)
    coef = float(stats.clip_coef)
    if clip == "active":
        assert float(total) > 4 * pub_max and coef < 0.25
        assert coef == pytest.approx(pub_max / (float(total) + 1e-6), rel=1e-5)
    else:
        assert float(total) < pub_max and coef == 1.0
    assert stats.w_mm.cpu().tolist() == [0.0, 0.0]
    assert stats.w_uni.cpu().tolist() == [alpha, alpha]

    # Honesty: the fusion module's unimodal gradient is non-zero and was dropped;
    # encoders get no multimodal gradient from this (detached) model.
    fus = [i for i, n in enumerate(ctx["names"]) if n.startswith("fusion_module")]
    enc = [i for i, g in enumerate(ctx["groups"]) if g >= 0]
    assert fus and all(float(ctx["b"][i].abs().max()) > 0 for i in fus)
    assert all(float(ctx["a"][i].abs().max()) == 0 for i in enc)
    naive = [ctx["a"][i] + alpha * ctx["b"][i] for i in fus]
    if clip == "active":
        naive = [t * coef for t in naive]
    assert_not_close([got[i] for i in fus], naive, "fusion grads vs a + alpha*b")


def test_dgl_drops_multimodal_gradient_of_undetached_model(backend):
    """docs/semantics.md: encoders get alpha * d(sum L_m) even if the model forgot the detach.

    mmfast on the undetached model must equal the published loop on the detached
    one (same weights), while the published loop on the undetached model differs.
    """
    alpha, max_norm = 4.0, 40.0
    dev = device_of(backend)
    model_det = make_seed_dgl(2, detach=True, device=dev)
    model_und = make_seed_dgl(2, detach=False, device=dev)
    model_und.load_state_dict(model_det.state_dict())
    model_und_pub = copy.deepcopy(model_und)
    x_a, x_v, y = make_inputs(2, dev)

    published_dgl_step(model_det, x_a, x_v, y, alpha=alpha, max_norm=max_norm)
    published_dgl_step(model_und_pub, x_a, x_v, y, alpha=alpha, max_norm=max_norm)
    stats, ctx = mmfast_step(model_und, torch.optim.SGD(model_und.parameters(), lr=0.01), x_a, x_v, y,
                             backend=backend, method="dgl", alpha=alpha, max_norm=max_norm)
    enc = [i for i, g in enumerate(ctx["groups"]) if g >= 0]
    assert any(float(ctx["a"][i].abs().max()) > 0 for i in enc)  # the leak is real
    assert_grads_close(grads_of(model_und), grads_of(model_det), "undetached mmfast vs detached published",
                       groups=ctx["groups"])
    assert_not_close([grads_of(model_und_pub)[i] for i in enc], [grads_of(model_det)[i] for i in enc],
                     "published loop on the undetached model leaks")


@pytest.mark.parametrize("max_norm", [40.0, 0.05], ids=["clip_inactive", "clip_active"])
def test_dgl_sgd_steps(backend, max_norm):
    alpha = 4.0
    dev = device_of(backend)
    model_pub = make_seed_dgl(0, device=dev)
    model_mmf = copy.deepcopy(model_pub)
    start = copy.deepcopy(model_pub)
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt_pub = torch.optim.SGD(model_pub.parameters(), **sgd)
    opt_mmf = torch.optim.SGD(model_mmf.parameters(), **sgd)
    for step in range(5):
        x_a, x_v, y = make_inputs(200 + step, dev)
        total = published_dgl_step(model_pub, x_a, x_v, y, alpha=alpha, max_norm=max_norm, optimizer=opt_pub)
        stats, _ = mmfast_step(model_mmf, opt_mmf, x_a, x_v, y, backend=backend, method="dgl",
                               alpha=alpha, max_norm=max_norm, step=True)
        assert (float(total) > max_norm) == (float(stats.clip_coef) < 1)
        if max_norm < 1:
            assert float(stats.clip_coef) < 1, "clipping should be active in this run"
        else:
            assert float(stats.clip_coef) == 1.0
        _assert_models_equal(model_pub, model_mmf, f"after step {step + 1}")
    assert_not_close(list(model_mmf.parameters()), list(start.parameters()), "the models moved")
