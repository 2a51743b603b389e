"""Mean cross-entropy over the targets that are not ignore_index, from logits in any float dtype.

    loss = cross_entropy(logits [M, V], targets [M], ignore_index=-100, backend="auto")

backend: "reference" (`F.cross_entropy` on an fp32 copy of the logits: with a 32K vocabulary and 8K
tokens that copy, its log-softmax and their gradients are about 3 GB and seven passes over 0.5-1 GB),
"triton" (one kernel reads each row, computes its log-sum-exp in fp32 and, when a gradient will be
needed, writes the row's gradient right away in the logits' dtype: a backward pass then only scales
it; CPU tensors only under TRITON_INTERPRET=1) or "auto" (triton for CUDA tensors when triton
imports, XINZHOU_TRITON is not 0 and not under torch.compile; else reference). All targets ignored gives nan, as torch does.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from xinzhou.ops import triton_allowed

BACKENDS = ("auto", "triton", "reference")


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


_TRITON: list[ModuleType | None] = []  # filled on first use, like ops/lightning.py


def _triton_module() -> ModuleType | None:
    if not _TRITON:
        try:
            from xinzhou.ops import cross_entropy_triton
        except ImportError:
            cross_entropy_triton = None
        _TRITON.append(cross_entropy_triton)
    return _TRITON[0]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  backend: str = "auto") -> torch.Tensor:
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}: expected one of {BACKENDS}")
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [M, V] and targets [M]: got {list(logits.shape)} and {list(targets.shape)}")
    if backend == "reference" or (backend == "auto" and not (logits.is_cuda and triton_allowed()
                                                              and not torch.compiler.is_compiling())):
        return cross_entropy_reference(logits, targets, ignore_index)
    module = _triton_module()
    if module is None:
        if backend == "triton":
            raise RuntimeError("backend='triton' but triton cannot be imported: install triton or use "
                               "backend='reference'")
        return cross_entropy_reference(logits, targets, ignore_index)
    return module.cross_entropy_triton(logits, targets, ignore_index)
