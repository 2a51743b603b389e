"""The fused elementwise kernels of a training step vs their PyTorch references, one process.

Each row times forward + backward of one op at the `small` preset's shapes for (B, T) = (1, 8192),
bf16, on the same input, with the fused Triton kernel (backend="triton") and with the PyTorch
reference (backend="reference"), and gives the ratio and the fused time over its byte floor
(the bytes the fused kernels must move, over a device-copy bandwidth measured in the same run):

  rms_norm       x [8192, 1024], weight [1024]: read x, write y; read x, dy, write dx
  cross_entropy  logits [8192, 32000]: read the logits (twice: loss, then gradient), write the
                 gradient; the backward scales it (read + write)
  swiglu         gate_up [16384, 2048] (8192 tokens x top-2): read it, write y; read it and dy,
                 write d(gate_up)

Before timing, each fused op's output and input gradient must match the reference's (relative
error under 2e-2 in bf16), or the run stops. Times are medians of CUDA-event-timed calls.

    python benchmarks/bench_ops.py --out bench_ops.json
    python benchmarks/bench_ops.py --device cpu --smoke --out /tmp/ops.json   # every path, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from timing import copy_bandwidth_bytes_per_ms, guarded, time_ms  # benchmarks/timing.py

TOL = 2e-2


@dataclass(frozen=True)
class Plan:
    tokens: int = 8192
    hidden: int = 1024
    vocab: int = 32000
    expert_dim: int = 1024
    top_k: int = 2
    reps: tuple[int, int] = (5, 30)
    copy_mib: int = 256


PLANS = {"full": Plan(), "smoke": Plan(tokens=64, hidden=96, vocab=300, expert_dim=48, reps=(1, 2), copy_mib=4)}


def cases(plan: Plan, device: torch.device) -> list[tuple[str, Callable, tuple, int]]:
    """(name, f(backend, *inputs) -> output, inputs, bytes the fused forward + backward must move)."""
    from xinzhou.ops.cross_entropy import cross_entropy
    from xinzhou.ops.moe import swiglu
    from xinzhou.ops.norm import rms_norm

    bf = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    M, C, V, F = plan.tokens, plan.hidden, plan.vocab, plan.expert_dim
    x = torch.randn(M, C, generator=g).to(device, bf)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(device, bf)
    logits = (2 * torch.randn(M, V, generator=g)).to(device, bf)
    targets = torch.randint(0, V, (M,), generator=g).to(device)
    gu = torch.randn(M * plan.top_k, 2 * F, generator=g).to(device, bf)
    b = 2  # bytes per bf16 element
    return [
        ("rms_norm", lambda be, x, w: rms_norm(x, w, 1e-5, backend=be), (x, w), b * M * C * 5),
        ("cross_entropy", lambda be, lg, t: cross_entropy(lg, t, backend=be), (logits, targets), b * M * V * 5),
        ("swiglu", lambda be, a: swiglu(a, backend=be), (gu,), b * M * plan.top_k * F * 9),
    ]


def run(f: Callable, backend: str, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = inputs[0].detach().requires_grad_()
    out = f(backend, leaf, *inputs[1:])
    # the same upstream gradient for both backends (a fixed seed)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    (grad,) = torch.autograd.grad(out, leaf, dy)
    return out, grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter: every path")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_ops.py needs a CUDA GPU; on a CPU only `--device cpu --smoke` runs")
    if args.device == "cpu":
        if not args.smoke:
            sys.exit("--device cpu is only for --smoke")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    plan = PLANS["smoke" if args.smoke else "full"]
    device = torch.device(args.device)
    bandwidth = copy_bandwidth_bytes_per_ms(plan.copy_mib, device)
    results: dict = {"plan": asdict(plan), "copy_bytes_per_ms": bandwidth, "rows": []}
    print(f"device copy {plan.copy_mib} MiB: {bandwidth / 1e9:.3f} TB/s (read + write)")
    for name, f, inputs, floor_bytes in cases(plan, device):
        fused, ref = run(f, "triton", inputs), run(f, "reference", inputs)
        errs = [rel_err(a.float(), b.float()) for a, b in zip(fused, ref)]
        if max(errs) > TOL:
            sys.exit(f"{name}: fused and reference disagree (output, gradient relative errors {errs})")
        row = {"op": name, "rel_err": errs, "floor_ms": floor_bytes / bandwidth}
        for backend in ("triton", "reference"):
            row[backend] = guarded(lambda be=backend: time_ms(lambda: run(f, be, inputs), *plan.reps, device), device)
        t, r = row["triton"], row["reference"]
        fmt = lambda v: f"{v:10.4f}" if isinstance(v, float) else f"{v:>10}"  # noqa: E731
        ratio = f"{r / t:6.2f}x" if isinstance(t, float) and isinstance(r, float) else "     -"
        x_floor = f"{t / row['floor_ms']:7.2f}x" if isinstance(t, float) else "      -"
        print(f"{name:14} fwd+bwd ms: fused {fmt(t)}  reference {fmt(r)}  reference/fused {ratio}  "
              f"fused/floor {x_floor} (floor {row['floor_ms']:.4f} ms)", flush=True)
        results["rows"].append(row)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
