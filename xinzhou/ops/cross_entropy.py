"""Mean cross-entropy over the targets that are not ignore_index, from logits in any float dtype.

    loss = cross_entropy(logits [M, V], targets [M], ignore_index=-100, backend="auto")

backend: "reference" (`F.cross_entropy` on an fp32 copy of the logits: with a 32K vocabulary and 8K
tokens that copy, its log-softmax and their gradients are about 3 GB and seven passes over 0.5-1 GB),
"triton" (one kernel reads each row, computes its log-sum-exp in fp32 and, when a gradient will be
needed, writes the row's gradient right away in the logits' dtype: a backward pass then only scales
it; CPU tensors only under TRITON_INTERPRET=1) or "auto" (triton for CUDA tensors when triton
imports, XINZHOU_TRITON is not 0 and not under torch.compile; else reference). All targets
ignored gives a nan loss (as torch does) and zero gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xinzhou.ops import pick_triton


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  backend: str = "auto") -> torch.Tensor:
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [M, V] and targets [M]: got {list(logits.shape)} and {list(targets.shape)}")
    module = pick_triton(logits, backend, "cross_entropy_triton")
    if module is None:
        return cross_entropy_reference(logits, targets, ignore_index)
    return module.cross_entropy_triton(logits, targets, ignore_index)
