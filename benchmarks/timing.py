"""Shared timing for the benchmark scripts (run as `python benchmarks/<script>.py`), and the
xinzhou / transformers model pair the CPU scripts compare."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

import torch

R = TypeVar("R")


def time_ms(fn: Callable[[], object], warmup: int, reps: int, device: torch.device) -> float:
    """Median milliseconds of fn after warmup: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_matmul_tflops(n: int, device: torch.device) -> float:
    """bf16 n^3 matmul rate on random data: the peak MFU and FLOP floors are taken against."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = time_ms(lambda: a @ b, 5, 20, device)
    return 2 * n**3 / ms / 1e9


def copy_bandwidth_bytes_per_ms(mib: int, device: torch.device) -> float:
    """Device-to-device copy rate of a mib-MiB buffer, counting bytes read and written."""
    x = torch.randint(0, 256, (mib * 2**20,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), 5, 20, device)
    return 2 * x.numel() / ms


def guarded(fn: Callable[[], R], device: torch.device, any_error: bool = False) -> R | str:
    """fn's timings, or why there are none: "OOM", or (any_error: third-party code whose failure
    should not end the run) "error: ..."."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        result = "OOM"
    except Exception as e:
        if not any_error:
            raise
        result = f"error: {type(e).__name__}: {str(e)[:200]}"
    if device.type == "cuda":  # outside the handler: its traceback no longer holds the failed call's tensors
        torch.cuda.empty_cache()
    return result


def git_commit() -> str | None:
    """The checkout's commit, for the record of a run (None outside a git checkout)."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True)
    except OSError:
        return None
    return res.stdout.strip() or None


def transformers_twin(cfg: "ModelConfig") -> tuple["XinzhouLM", "torch.nn.Module"]:
    """An fp32 XinzhouLM with seed-0 random weights, and transformers' model loaded from its
    save_hf checkpoint; exits when their fp32 logits disagree (two different functions)."""
    import sys
    import tempfile
    from pathlib import Path

    import transformers

    from xinzhou.hf import save_hf
    from xinzhou.model import XinzhouLM

    transformers.logging.set_verbosity_error()  # it lists the derived lightning decay buffers as missing
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    xz = XinzhouLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(xz, Path(tmp) / "ckpt")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "ckpt", dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = xz.eval()(ids), hf.eval()(input_ids=ids, use_cache=False).logits
    diff = (a - b).abs().max().item()
    print(f"fp32 logits: max |xinzhou - transformers| = {diff:.3g} (max |logit| {b.abs().max().item():.3g})")
    if diff > 1e-3 * b.abs().max().item():
        sys.exit("xinzhou and transformers disagree in fp32: not timing two different functions")
    return xz, hf
