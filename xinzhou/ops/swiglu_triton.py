"""SwiGLU of the MoE experts in Triton: y = silu(gate) * up from the grouped GEMM's [M, 2F] output
(gate columns first), in one pass; the backward writes d(gate) and d(up) in one pass too. Eager
PyTorch takes a silu, a product and, backwards, three products and a concatenation. Math in fp32.
CPU tensors work under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from xinzhou.ops import on_device

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 1024


@triton.jit
def _fwd_kernel(gu, y, n, F, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    row, col = i // F, i % F
    g = tl.load(gu + row * 2 * F + col, mask=m, other=0.).to(tl.float32)
    u = tl.load(gu + row * 2 * F + F + col, mask=m, other=0.).to(tl.float32)
    tl.store(y + i, (g * tl.sigmoid(g) * u).to(y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(gu, dy, dgu, n, F, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    row, col = i // F, i % F
    g = tl.load(gu + row * 2 * F + col, mask=m, other=0.).to(tl.float32)
    u = tl.load(gu + row * 2 * F + F + col, mask=m, other=0.).to(tl.float32)
    d = tl.load(dy + i, mask=m, other=0.).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(dgu + row * 2 * F + col, (d * u * sig * (1 + g * (1 - sig))).to(dgu.dtype.element_ty), mask=m)
    tl.store(dgu + row * 2 * F + F + col, (d * g * sig).to(dgu.dtype.element_ty), mask=m)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu: torch.Tensor) -> torch.Tensor:
        M, F2 = gu.shape
        y = torch.empty((M, F2 // 2), dtype=gu.dtype, device=gu.device)
        if y.numel():
            with on_device(gu):
                _fwd_kernel[(triton.cdiv(y.numel(), BLOCK),)](gu, y, y.numel(), F2 // 2, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gu)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (gu,) = ctx.saved_tensors
        dgu = torch.empty_like(gu)
        n = dy.numel()
        if n:
            with on_device(gu):
                _bwd_kernel[(triton.cdiv(n, BLOCK),)](gu, dy.contiguous(), dgu, n, gu.shape[1] // 2, BLOCK=BLOCK,
                                                      num_warps=4)
        return dgu


def swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2F] (gate columns, then up columns) -> silu(gate) * up [M, F]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [M, 2F]: got {list(gate_up.shape)}")
    if not gate_up.is_cuda and not INTERPRET:
        raise RuntimeError("triton swiglu got CPU tensors: set TRITON_INTERPRET=1 before triton is first "
                           "imported, or use backend='reference'")
    return _SwiGLUFunction.apply(gate_up.contiguous())
