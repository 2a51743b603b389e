"""Kernels, each with a PyTorch reference: lightning attention, MoE experts, RMSNorm, cross-entropy.

Their backend="auto" picks Triton for CUDA tensors. XINZHOU_TRITON=0 in the environment makes every
"auto" pick the reference instead: to compare, or to rule a kernel out when something looks wrong.
"""

import os


def triton_allowed() -> bool:
    return os.environ.get("XINZHOU_TRITON", "1") != "0"
