"""Cross-entropy in Triton: per row, an online log-sum-exp over the vocabulary in fp32 blocks, the
row's loss, and (when a gradient will be needed) the row's gradient softmax - onehot written in the
logits' dtype in the same kernel; the backward multiplies it in place by grad_output / (number of
targets), in fp32, read on the device (no host sync, no second [M, V] buffer).
Semantics: ops/cross_entropy.py. CPU tensors work under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from xinzhou.ops import on_device

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 256 if INTERPRET else 4096  # vocabulary columns a loop step reads
SCALE_BLOCK = 4096


@triton.jit
def _ce_kernel(logits, targets, loss, grad, V, stride, ignore_index, BLOCK: tl.constexpr,
               STORE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride
    t = tl.load(targets + row).to(tl.int64)
    valid = t != ignore_index
    cols = tl.arange(0, BLOCK)
    m = float("-inf")  # running max and sum of exp(x - m) over the row
    s = 0.
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))  # finite: every block holds at least one logit
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    in_range = (t >= 0) & (t < V)
    x_t = tl.load(base + tl.where(valid & in_range, t, 0)).to(tl.float32)
    # a target outside the vocabulary makes the loss nan (torch raises; this kernel cannot, nor read it)
    tl.store(loss + row, tl.where(valid, tl.where(in_range, lse - x_t, float("nan")), 0.))
    if STORE_GRAD:
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(c == t, 1., 0.)
            g = tl.where(valid, g, 0.)
            tl.store(grad + row * V + c, g.to(grad.dtype.element_ty), mask=c < V)


@triton.jit
def _scale_kernel(x, scale, n, BLOCK: tl.constexpr):
    """x *= scale[0] in place, the product in fp32 (one rounding), the scale read on the device."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(x + i, (tl.load(x + i, mask=m, other=0.).to(tl.float32) * tl.load(scale)).to(x.dtype.element_ty),
             mask=m)


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        M, V = logits.shape
        store_grad = ctx.needs_input_grad[0]
        loss_rows = torch.empty(M, dtype=torch.float32, device=logits.device)
        grad = torch.empty((M, V), dtype=logits.dtype, device=logits.device) if store_grad else None
        if M:
            with on_device(logits):
                _ce_kernel[(M,)](logits, targets, loss_rows, grad, V, logits.stride(0), ignore_index, BLOCK=BLOCK,
                                 STORE_GRAD=store_grad, num_warps=8)
        n = (targets != ignore_index).sum()  # on the device: no host sync
        ctx.save_for_backward(grad, n)
        ctx.scaled = False
        return loss_rows.sum() / n  # nan when every target is ignored, as torch gives

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        grad, n = ctx.saved_tensors
        if ctx.scaled:
            raise RuntimeError("cross_entropy_triton scales its stored gradient in place: a second backward "
                               "through the same graph (retain_graph=True) is not supported")
        ctx.scaled = True
        # no target: every stored row is zero, and so is the gradient (torch gives zeros too, not nan)
        scale = (grad_output.float() / n.clamp(min=1)).reshape(1)
        if grad.numel():
            with on_device(grad):
                _scale_kernel[(triton.cdiv(grad.numel(), SCALE_BLOCK),)](grad, scale, grad.numel(), BLOCK=SCALE_BLOCK,
                                                                         num_warps=4)
        return grad, None, None


def cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits [M, V] (rows contiguous), targets [M] int; see ops/cross_entropy.py."""
    if not logits.is_cuda and not INTERPRET:
        raise RuntimeError("triton cross_entropy got CPU tensors: set TRITON_INTERPRET=1 before triton is "
                           "first imported, or use backend='reference'")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _CrossEntropyFunction.apply(logits, targets.contiguous(), ignore_index)
