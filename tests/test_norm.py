"""Fused RMSNorm (ops/norm_triton.py) against the reference formula (ops/norm.py), values and
gradients. Runs on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

from xinzhou.config import preset
from xinzhou.model import XinzhouLM
from xinzhou.ops import norm
from xinzhou.ops.norm import rms_norm, rms_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,wdtype,tol", [(torch.float32, torch.float32, 1e-6),
                                              (torch.bfloat16, torch.bfloat16, 1e-2),
                                              (torch.float16, torch.float16, 2e-3),
                                              (torch.bfloat16, torch.float32, 1e-2)])  # autocast-style mix
@pytest.mark.parametrize("shape", [(3, 5, 100), (7, 1024), (1, 1), (0, 64)])
def test_matches_reference(dtype, wdtype, tol, shape):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, wdtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(DEVICE)
    y = rms_norm(x, w, 1e-6, backend="triton")
    y_ref = rms_norm_reference(x, w, 1e-6)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    if y.numel() == 0:
        return
    # forward: within two rounding steps of x's dtype, to which the normalised value is rounded (the
    # sums run in another order; triton 3.9's interpreter also truncates casts to bf16/fp16 where
    # the GPU rounds to nearest)
    ulp = max(torch.finfo(x.dtype).eps, torch.finfo(y.dtype).eps)
    assert ((y.float() - y_ref.float()).abs() <= 2 * ulp * y_ref.float().abs() + 1e-6).all()
    grads = torch.autograd.grad((y.float() * dy).sum(), (x, w))
    grads_ref = torch.autograd.grad((y_ref.float() * dy).sum(), (x, w))
    for name, a, b in zip(("dx", "dw"), grads, grads_ref):
        assert a.dtype == b.dtype, name
        # with N = 1 the exact dx is 0 and both are rounding noise: hence the absolute floor
        assert (a.double() - b.double()).norm() <= tol * b.double().norm() + 1e-5, name


def test_errors_name_the_problem():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(4, device=DEVICE), 1e-6, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, torch.ones(8, device=DEVICE), 1e-6, backend="cuda")


def test_model_with_the_fused_norm_matches_the_reference(monkeypatch):
    torch.manual_seed(0)
    model = XinzhouLM(preset("tiny")).to(DEVICE)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), device=DEVICE)
    ref = model(ids, ids)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    monkeypatch.setattr("xinzhou.model.rms_norm", lambda x, w, eps: norm.rms_norm(x, w, eps, backend="triton"))
    out = model(ids, ids)
    g = torch.autograd.grad(out, list(model.parameters()))
    assert abs(out.item() - ref.item()) < 1e-5
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(g, g_ref))
