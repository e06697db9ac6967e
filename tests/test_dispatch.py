"""Which backend combine_ picks, from the tensors' device and what is available."""
import pytest
import torch

import mmfast
from mmfast.ops import _backends
from mmfast.ops._backends import BackendInfo, select_backend

YES, NO = BackendInfo(True, ""), BackendInfo(False, "not here")


def fake(monkeypatch, **available):
    info = {name: (YES if available.get(name, name in ("foreach", "torch")) else NO) for name in _backends.BACKENDS}
    monkeypatch.setattr(_backends, "backends", lambda: info)


@pytest.mark.parametrize(
    "available, device, expected",
    [
        ({"cpu": True}, "cpu", "cpu"),
        ({"cpu": False}, "cpu", "foreach"),
        ({"cuda": True, "triton": True}, "cuda", "cuda"),
        ({"cuda": False, "triton": True}, "cuda", "triton"),
        ({"cuda": False, "triton": False}, "cuda", "foreach"),
        ({"cpu": True, "cuda": True, "triton": True}, "cpu", "cpu"),  # never a GPU backend for CPU tensors
    ],
)
def test_default_choice(monkeypatch, available, device, expected):
    fake(monkeypatch, **available)
    assert select_backend(None, torch.device(device)) == expected


def test_explicit_choice_is_checked(monkeypatch):
    fake(monkeypatch, cpu=True, cuda=True)
    assert select_backend("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        select_backend("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        select_backend("cpu", torch.device("cuda"))
    fake(monkeypatch, cuda=False)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: not here"):
        select_backend("cuda", torch.device("cuda"))


def test_cpu_tensors_use_the_extension_by_default():
    if not mmfast.backends()["cpu"].available:
        pytest.skip("cpu backend not built")
    assert select_backend(None, torch.device("cpu")) == "cpu"


def test_triton_interpreter_backend_runs_here():
    info = mmfast.backends()["triton"]
    if not info.available:
        pytest.skip(info.reason)
    a = [torch.randn(40), torch.randn(3)]
    out = [torch.empty_like(x) for x in a]
    stats = mmfast.combine_(out, a, a, backend="triton")
    for o, x in zip(out, a):
        torch.testing.assert_close(o, 1.5 * 2 * x)  # identical gradients: no conflict, gamma*(a+b)
    assert stats.w_mm.item() == 0.5
