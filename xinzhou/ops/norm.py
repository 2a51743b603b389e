"""RMSNorm as MiniMax computes it: statistics in fp32, normalised value rounded to the input dtype,
then scaled by the weight:  y = w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype).

    y = rms_norm(x, weight, eps, backend="auto")

backend: "reference" (the formula above in PyTorch, several passes over x in fp32), "triton" (one
read and one write per pass, forward and backward; CPU tensors only under TRITON_INTERPRET=1) or
"auto" (triton for CUDA tensors when triton imports, XINZHOU_TRITON is not 0 and not under
torch.compile, which fuses the reference itself; else reference). The two agree to a rounding step
of x's dtype: the sums run in another order.
"""

from __future__ import annotations

from types import ModuleType

import torch

from xinzhou.ops import triton_allowed

BACKENDS = ("auto", "triton", "reference")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


_TRITON: list[ModuleType | None] = []  # filled on first use, like ops/lightning.py


def _triton_module() -> ModuleType | None:
    if not _TRITON:
        try:
            from xinzhou.ops import norm_triton
        except ImportError:
            norm_triton = None
        _TRITON.append(norm_triton)
    return _TRITON[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """x [..., N], weight [N] -> y [..., N] in the dtype of weight * x (the reference's promotion)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}: expected one of {BACKENDS}")
    if backend == "reference" or (backend == "auto" and not (x.is_cuda and triton_allowed()
                                                              and not torch.compiler.is_compiling())):
        return rms_norm_reference(x, weight, eps)
    module = _triton_module()
    if module is None:
        if backend == "triton":
            raise RuntimeError("backend='triton' but triton cannot be imported: install triton or use "
                               "backend='reference'")
        return rms_norm_reference(x, weight, eps)
    return module.rms_norm_triton(x, weight, eps)
