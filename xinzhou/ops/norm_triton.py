"""RMSNorm in Triton: one pass over x forward (y and the fp32 1/rms per row), one pass backward
(dx per row; dw as per-program partial sums over blocks of rows, added up by torch).

Follows `ops/norm.py`'s reference rounding: the normalised value is rounded to x's dtype before the
weight multiplies it, and the gradient reaching it is rounded likewise. M rows of N features;
N up to MAX_N in one tile. CPU tensors work under TRITON_INTERPRET=1 (set before triton is imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from xinzhou.ops import on_device, sm_count

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_N = 65536


@triton.jit
def _fwd_kernel(x, w, y, rstd, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    m = cols < N
    b_x = tl.load(x + row * N + cols, mask=m, other=0.).to(tl.float32)
    b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / N + eps)
    b_n = (b_x * b_r).to(x.dtype.element_ty).to(tl.float32)  # rounded like the reference
    b_w = tl.load(w + cols, mask=m, other=0.).to(tl.float32)
    tl.store(y + row * N + cols, (b_w * b_n).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + row, b_r)


@triton.jit
def _bwd_kernel(x, w, dy, dx, rstd, dw_part, M, N, ROWS, BLOCK_N: tl.constexpr):
    """Rows [pid * ROWS, pid * ROWS + ROWS): dx = r * (g - n * mean(g * n)) with n = x * r and
    g = dy * w (the gradient of the rounded n); dw_part[pid] = sum over the rows of dy * round(n)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    m = cols < N
    b_w = tl.load(w + cols, mask=m, other=0.).to(tl.float32)
    b_dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, ROWS):
        row = pid.to(tl.int64) * ROWS + i
        if row < M:
            b_x = tl.load(x + row * N + cols, mask=m, other=0.).to(tl.float32)
            b_dy = tl.load(dy + row * N + cols, mask=m, other=0.).to(tl.float32)
            b_r = tl.load(rstd + row)
            b_n = b_x * b_r
            b_dw += b_dy * b_n.to(x.dtype.element_ty).to(tl.float32)
            b_g = (b_dy * b_w).to(x.dtype.element_ty).to(tl.float32)
            b_dx = b_r * (b_g - b_n * (tl.sum(b_g * b_n, axis=0) / N))
            tl.store(dx + row * N + cols, b_dx.to(dx.dtype.element_ty), mask=m)
    tl.store(dw_part + pid.to(tl.int64) * N + cols, b_dw, mask=m)


def _warps(block_n: int) -> int:
    return min(16, max(1, block_n // 256))


def _forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = x2.shape
    y = torch.empty((M, N), dtype=torch.promote_types(weight.dtype, x2.dtype), device=x2.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2.device)
    if M:
        block = triton.next_power_of_2(N)
        with on_device(x2):
            _fwd_kernel[(M,)](x2, weight, y, rstd, N, eps, BLOCK_N=block, num_warps=_warps(block))
    return y, rstd


def _backward(x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
              dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = x2.shape
    dx = torch.empty_like(x2)
    block = triton.next_power_of_2(N)
    # enough programs to fill the SMs (wide rows take a whole SM's registers), each over `rows` rows
    per_sm = 4 if block < 4096 else 1
    rows = triton.cdiv(M, max(1, min(M, per_sm * sm_count(x2.device))))
    programs = max(1, triton.cdiv(M, rows))
    dw_part = torch.empty((programs, N), dtype=torch.float32, device=x2.device)
    with on_device(x2):
        _bwd_kernel[(programs,)](x2, weight, dy, dx, rstd, dw_part, M, N, rows, BLOCK_N=block,
                                 num_warps=_warps(block))
    return dx, dw_part.sum(0).to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = _forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(x2, weight, rstd, dy.contiguous())
        return dx, dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N], weight [N]; see ops/norm.py."""
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"weight must be [N] = [{N}]: got {list(weight.shape)}")
    if N > MAX_N:
        raise ValueError(f"triton rms_norm supports rows up to {MAX_N} features: got {N}")
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError("triton rms_norm got CPU tensors: set TRITON_INTERPRET=1 before triton is first "
                           "imported, or use backend='reference'")
    y = _RMSNormFunction.apply(x.reshape(-1, N).contiguous(), weight.contiguous(), eps)
    return y.view(*x.shape[:-1], N)
