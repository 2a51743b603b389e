"""Cross-entropy in Triton: per row, an online log-sum-exp over the vocabulary in fp32 blocks, the
row's loss, and (when a gradient will be needed) the row's gradient softmax - onehot written in the
logits' dtype in the same kernel; the backward multiplies it by grad_output / (number of targets).
Semantics: ops/cross_entropy.py. CPU tensors work under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 256 if INTERPRET else 4096  # vocabulary columns a loop step reads


@triton.jit
def _ce_kernel(logits, targets, loss, grad, V, stride, ignore_index, BLOCK: tl.constexpr,
               STORE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride
    t = tl.load(targets + row).to(tl.int64)
    valid = t != ignore_index
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)  # running max and sum per lane
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        ref = tl.where(m_new == float("-inf"), 0., m_new)  # lanes that have seen only padding: no -inf - -inf
        s = s * tl.exp(m - ref) + tl.exp(x - ref)
        m = m_new
    m_all = tl.max(m, axis=0)
    lse = m_all + tl.log(tl.sum(s * tl.exp(m - m_all), axis=0))
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


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        M, V = logits.shape
        store_grad = ctx.needs_input_grad[0]
        loss_rows = torch.empty(M, dtype=torch.float32, device=logits.device)
        grad = torch.empty((M, V), dtype=logits.dtype, device=logits.device) if store_grad else None
        if M:
            _ce_kernel[(M,)](logits, targets, loss_rows, grad, V, logits.stride(0), ignore_index, BLOCK=BLOCK,
                             STORE_GRAD=store_grad, num_warps=8)
        n = (targets != ignore_index).sum()  # on the device: no host sync
        ctx.save_for_backward(grad, n)
        return loss_rows.sum() / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad, n = ctx.saved_tensors
        return grad * (grad_output / n).to(grad.dtype), None, None


def cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits [M, V] (rows contiguous), targets [M] int; see ops/cross_entropy.py."""
    if not logits.is_cuda and not INTERPRET:
        raise RuntimeError("triton cross_entropy got CPU tensors: set TRITON_INTERPRET=1 before triton is "
                           "first imported, or use backend='reference'")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _CrossEntropyFunction.apply(logits, targets.contiguous(), ignore_index)
