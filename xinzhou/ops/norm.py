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

import torch

from xinzhou.ops import pick_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """x [..., N], weight [N] -> y [..., N] in the dtype of weight * x (the reference's promotion)."""
    module = pick_triton(x, backend, "norm_triton")
    if module is None:
        return rms_norm_reference(x, weight, eps)
    return module.rms_norm_triton(x, weight, eps)
