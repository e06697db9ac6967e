"""Smoke test of an *installed* mmfast, run by `make sdist-check` (.ci/sdist_check.sh).

    cd /somewhere/outside && VENV/bin/python -I smoke_installed.py CHECKOUT

It lives in .ci/ rather than tests/ because it must never run against the checkout:
pytest would import it with the checkout on sys.path. `-I` keeps this file's folder
(and PYTHON* variables) off sys.path; the first check proves mmfast and every module
of it come from the venv's site-packages, not from CHECKOUT.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the Triton kernels on CPU tensors

import importlib  # noqa: E402
import importlib.metadata as md  # noqa: E402
import pkgutil  # noqa: E402
import sysconfig  # noqa: E402

import torch  # noqa: E402

checkout = os.path.realpath(sys.argv[1])


def under(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


assert not under(os.getcwd(), checkout), f"run me from outside the checkout, not {os.getcwd()}"
assert not any(p in ("", ".") or under(p, checkout) and not p.endswith("site-packages") for p in sys.path), sys.path

import mmfast  # noqa: E402

# --- 1. Where it comes from: the venv's site-packages, every module of it.
site = sysconfig.get_paths()["purelib"]
assert under(mmfast.__file__, site) and not under(mmfast.__file__, checkout), mmfast.__file__
modules = ["mmfast"] + [m.name for m in pkgutil.walk_packages(mmfast.__path__, "mmfast.")]
for name in modules:
    mod = importlib.import_module(name)
    assert under(mod.__file__, site), f"{name} imported from {mod.__file__}, not from {site}"
for name in ("mmfast._C", "mmfast.kernels", "mmfast.kernels.combine", "mmfast.kernels.multi", "mmfast.ops",
             "mmfast.training", "mmfast.pytorch.reference", "mmfast.pytorch.foreach", "mmfast.weightings"):
    assert name in modules, f"{name} is not installed ({modules})"
# The library only: the models bench/ and tests/ share live in testbed/, never installed.
assert not [m for m in modules if m.rsplit(".", 1)[-1] in ("models", "testbed")], modules

# --- 2. Metadata: one version everywhere, the license, the extras.
dist = md.distribution("mmfast")
assert under(str(dist.locate_file("mmfast/__init__.py")), site), "the mmfast metadata found is not this venv's"
assert dist.version == mmfast.__version__, (dist.version, mmfast.__version__)
meta = dist.metadata
assert meta["License-Expression"] == "MIT", meta["License-Expression"]
assert set(meta.get_all("Provides-Extra")) == {"test", "bench"}, meta.get_all("Provides-Extra")
assert any(r.startswith("torch>=") for r in meta.get_all("Requires-Dist")), meta.get_all("Requires-Dist")
# What the wheel pip built put on disk (RECORD): the package, one extension, the metadata.
files = [str(f) for f in dist.files]
assert any(f.endswith("licenses/LICENSE") for f in files), f"no LICENSE in the installed metadata: {files}"
so = [f for f in files if f.startswith("mmfast/_C") and f.endswith(".so")]
assert len(so) == 1, f"installed {so}: want exactly one mmfast._C"
dist_info = f"mmfast-{mmfast.__version__}.dist-info"
stray = [f for f in files if f.split("/")[0] not in ("mmfast", dist_info)]
assert not stray, f"installed outside the package: {stray}"

# --- 3. Backends: CPU kernels compiled, Triton (interpreter), the pure-PyTorch paths.
info = mmfast.backends()
for name, b in info.items():
    print(f"smoke: backend {name:8s} {'yes' if b.available else 'no: ' + b.reason}")
for name in ("cpu", "triton", "foreach", "torch"):
    assert info[name].available, (name, info[name])
from mmfast.ops._backends import _C  # noqa: E402

if torch.version.cuda is None:  # a CPU torch: no CUDA kernels, and backends() must say why
    assert not _C.cuda_built() and not info["cuda"].available
    assert "without CUDA" in info["cuda"].reason, info["cuda"].reason
if not torch.cuda.is_available():
    assert not info["cuda"].available and info["cuda"].reason, info["cuda"]

# --- 4. One combine_ per CPU-side backend against the fp64 reference.
# Tolerance: out = ca*a + cb*b in fp32; ca, cb come from dots over <= 515 elements
# (relative error <= n*u ~ 3e-5 even summed naively, u = 6e-8) through a min-norm
# weight whose denominator |a - b|^2 is about |a|^2 here (b ~ -0.6 a: a conflict), so
# 1e-4 of the largest |out| bounds every backend's error with margin.
g = torch.Generator().manual_seed(0)
shapes, groups = [(7, 11), (3,), (515,), (4, 4)], [0, 0, 1, -1]
a = [torch.randn(s, generator=g) for s in shapes]
b = [-0.6 * x + 0.5 * torch.randn(x.shape, generator=g) for x in a]
ref = [torch.empty_like(x, dtype=torch.float64) for x in a]
ref_stats = mmfast.combine_(ref, [x.double() for x in a], [x.double() for x in b], groups=groups, backend="torch")
assert bool(ref_stats.conflict.all()), "the smoke inputs must exercise the conflict branch"
scale = max(float(r.abs().max()) for r in ref)
for backend in ("cpu", "foreach", "torch", "triton"):
    out = [torch.full_like(x, float("nan")) for x in a]  # poisoned: every element must be written
    stats = mmfast.combine_(out, a, b, groups=groups, backend=backend)
    err = max(float((o.double() - r).abs().max()) for o, r in zip(out, ref))
    assert err <= 1e-4 * scale, f"combine_ backend={backend}: max error {err:.3g} (scale {scale:.3g})"
    assert torch.equal(stats.conflict.cpu(), ref_stats.conflict.cpu()), backend
    print(f"smoke: combine_ backend={backend:8s} max error {err:.2e} (scale {scale:.2f})")

# --- 5. One MMPareto.backward on a tiny model against the reference on per-loss gradients.
torch.manual_seed(0)
audio, visual, head = torch.nn.Linear(5, 4), torch.nn.Linear(6, 4), torch.nn.Linear(8, 3)
x_a, x_v, y = torch.randn(10, 5), torch.randn(10, 6), torch.randint(0, 3, (10,))
ha, hv = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
params = [*audio.parameters(), *visual.parameters(), *head.parameters(), *ha.parameters(), *hv.parameters()]
ce = torch.nn.functional.cross_entropy


def losses():
    f_a, f_v = audio(x_a).relu(), visual(x_v).relu()
    return ce(head(torch.cat([f_a, f_v], 1)), y), {"audio": ce(ha(f_a), y), "visual": ce(hv(f_v), y)}


loss_mm, uni = losses()
g_mm, g_a, g_v = (torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
                  for loss in (loss_mm, uni["audio"], uni["visual"]))
g_mm, g_a, g_v = ([torch.zeros_like(p, dtype=torch.float64) if t is None else t.double() for p, t in zip(params, gs)] for gs in (g_mm, g_a, g_v))
grp = [0, 0, 1, 1] + [-1] * 6  # audio.{weight,bias}, visual.{weight,bias}, then the heads
uni_grad = [ga if k == 0 else gv if k == 1 else ga + gv for k, ga, gv in zip(grp, g_a, g_v)]
expected = [torch.empty_like(x) for x in g_mm]
mmfast.combine_(expected, g_mm, uni_grad, groups=grp, backend="torch")

mmp = mmfast.MMPareto({"audio": audio, "visual": visual})
loss_mm, uni = losses()
stats = mmp.backward(loss_mm, uni)
scale = max(float(e.abs().max()) for e in expected)
err = max(float((p.grad.double() - e).abs().max()) for p, e in zip(params, expected))
assert err <= 1e-4 * scale, f"MMPareto.backward: max error {err:.3g} (scale {scale:.3g})"
print(f"smoke: MMPareto.backward max error {err:.2e}, stats {stats.as_dict()}")
print(f"smoke: OK (mmfast {mmfast.__version__} from {os.path.dirname(mmfast.__file__)}, {len(modules)} modules)")
