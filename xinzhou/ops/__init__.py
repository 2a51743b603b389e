"""Kernels, each with a PyTorch reference: lightning attention, MoE experts, RMSNorm, cross-entropy.

Their backend="auto" picks Triton for CUDA tensors. XINZHOU_TRITON=0 in the environment makes every
"auto" pick the reference instead: to compare, or to rule a kernel out when something looks wrong.
"""

import contextlib
import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "reference")
_MODULES: dict[str, ModuleType | None] = {}  # Triton modules, imported on first use (CPU callers never load triton)


def triton_allowed() -> bool:
    return os.environ.get("XINZHOU_TRITON", "1") != "0"


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it t's (a model on cuda:1 without set_device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def triton_module(name: str) -> ModuleType | None:
    """xinzhou.ops.<name> (a Triton kernel module), or None when triton cannot be imported."""
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(f"xinzhou.ops.{name}")
        except ImportError:
            _MODULES[name] = None
    return _MODULES[name]


def pick_triton(t: torch.Tensor, backend: str, name: str, under_compile: bool = False) -> ModuleType | None:
    """The Triton module `name` when this call should use it, else None (the PyTorch reference).
    "auto" takes Triton for CUDA tensors unless XINZHOU_TRITON=0, and under torch.compile only where
    the kernels are compiler-visible ops (under_compile; elsewhere the compiler fuses the reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}: expected one of {BACKENDS}")
    if backend == "reference" or (backend == "auto" and not (
            t.is_cuda and triton_allowed() and (under_compile or not torch.compiler.is_compiling()))):
        return None
    module = triton_module(name)
    if module is None and backend == "triton":
        raise RuntimeError("backend='triton' but triton cannot be imported: install triton or use backend='reference'")
    return module


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the CPU interpreter, so tests see several)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
