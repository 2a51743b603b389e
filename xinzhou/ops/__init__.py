"""Kernels, each with a PyTorch reference: lightning attention, MoE experts, RMSNorm, cross-entropy.

Their backend="auto" picks Triton for CUDA tensors. XINZHOU_TRITON=0 in the environment makes every
"auto" pick the reference instead: to compare, or to rule a kernel out when something looks wrong.
"""

import contextlib
import os

import torch


def triton_allowed() -> bool:
    return os.environ.get("XINZHOU_TRITON", "1") != "0"


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it t's (a model on cuda:1 without set_device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
