"""Fused cross-entropy (ops/cross_entropy_triton.py) against torch's F.cross_entropy on fp32 logits:
loss and logit gradients. Runs on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

from xinzhou.config import preset
from xinzhou.model import XinzhouLM
from xinzhou.ops import cross_entropy as ce_module
from xinzhou.ops.cross_entropy import cross_entropy, cross_entropy_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("M,V", [(5, 1), (7, 300), (3, 1000)])  # V = 1000: four loop steps of the interpreter's 256
def test_matches_torch(dtype, tol, M, V):
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(M, V, generator=g)).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, V, (M,), generator=g).to(DEVICE)
    targets[1] = -100  # ignored
    loss = cross_entropy(logits, targets, backend="triton")
    ref = cross_entropy_reference(logits, targets)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    grad = torch.autograd.grad(3.0 * loss, logits)[0]  # grad_output != 1 scales the stored gradient
    grad_ref = torch.autograd.grad(3.0 * ref, logits)[0]
    assert grad.dtype == dtype
    assert (grad.float() - grad_ref.float()).norm() <= tol * grad_ref.float().norm() + 1e-6
    assert bool((grad[1] == 0).all())  # the ignored row gets no gradient


def test_all_ignored_is_nan_like_torch_and_bad_target_is_nan():
    logits = torch.randn(3, 10, device=DEVICE)
    ignored = torch.full((3,), -100, device=DEVICE)
    assert torch.isnan(cross_entropy(logits, ignored, backend="triton"))
    assert torch.isnan(cross_entropy_reference(logits, ignored))
    bad = torch.tensor([1, 10, 2], device=DEVICE)  # 10 is outside the vocabulary
    assert torch.isnan(cross_entropy(logits, bad, backend="triton"))


def test_all_ignored_gives_zero_gradients_and_a_second_backward_is_refused():
    # train.py uses ce * 0 for a micro-batch without targets: its gradients must be zeros, not nan
    logits = torch.randn(3, 10, device=DEVICE, requires_grad=True)
    loss = cross_entropy(logits, torch.full((3,), -100, device=DEVICE), backend="triton")
    (grad,) = torch.autograd.grad(loss * 0.0, logits)
    assert bool((grad == 0).all())
    loss = cross_entropy(logits, torch.tensor([1, 2, 3], device=DEVICE), backend="triton")
    torch.autograd.grad(loss, logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        torch.autograd.grad(loss, logits)


def test_no_grad_skips_the_gradient_and_shapes_are_checked():
    logits = torch.randn(4, 50, device=DEVICE)
    t = torch.randint(0, 50, (4,), device=DEVICE)
    with torch.no_grad():
        loss = cross_entropy(logits.requires_grad_(), t, backend="triton")
    assert abs(loss.item() - cross_entropy_reference(logits, t).item()) < 1e-5
    with pytest.raises(ValueError, match=r"\[M, V\]"):
        cross_entropy(logits, t[:3], backend="triton")


def test_model_loss_with_the_fused_kernel_matches(monkeypatch):
    torch.manual_seed(0)
    model = XinzhouLM(preset("tiny")).to(DEVICE)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), device=DEVICE)
    targets = ids.clone()
    targets[0, :5] = -100
    ref = model(ids, targets)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    monkeypatch.setattr("xinzhou.model.cross_entropy",
                        lambda lg, t, ignore_index: ce_module.cross_entropy(lg, t, ignore_index, backend="triton"))
    out = model(ids, targets)
    g = torch.autograd.grad(out, list(model.parameters()))
    assert abs(out.item() - ref.item()) < 1e-5
    assert all((a - b).norm() <= 1e-4 * b.norm() + 1e-7 for a, b in zip(g, g_ref))
