"""Lightning attention speed on the GPU: xinzhou Triton vs fla `chunk_simple_gla` vs torch SDPA causal.

Times forward and forward+backward (bf16, D = 128) for T in {2K, 8K, 32K, 128K} and (B, H) in
{(1, 16), (4, 32)}, a decode step at batch 1 / 64 / 256 (H = 16) against the fp32 state read+write
floor, and checks the relative error of the bf16 kernels against an fp32 reference at one shape.
Timings are medians of CUDA-event-timed calls; the anchors (fla, SDPA, a device copy) run in the same
process, so quote the ratios. fla's MiniMax-exact call is chunk_simple_gla(q, k, v, g_gamma=-slopes,
scale=1.0) (fla's chunk_lightning_attn has another decay and a 1/sqrt(D) scale).

    python benchmarks/bench_lightning.py --out bench_lightning.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable

import torch
from timing import time_ms  # benchmarks/timing.py (scripts run from their folder)

D = 128
SEQ_LENS = (2048, 8192, 32768, 131072)
BATCH_HEADS = ((1, 16), (4, 32))
DECODE_BATCHES = (1, 64, 256)
DECODE_HEADS = 16
DEVICE = "cuda"
CUDA = torch.device("cuda")
SDPA_MAX_T = 32768  # SDPA causal at 128K takes ~0.5 s per fwd+bwd for B=1, H=16: not worth the minutes


def alibi_slopes(H: int, device: str) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], device=device)


def reps_for(T: int, B: int, H: int) -> tuple[int, int]:
    work = T * B * H / (2048 * 16)
    return (3, 5) if work >= 256 else (5, 20) if work >= 16 else (10, 50)


def load_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError:
        return None, None
    return chunk_simple_gla, fused_recurrent_simple_gla


def fwd_and_fwdbwd(attn: Callable, q, k, v, do, warmup: int, reps: int) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            return attn(q, k, v)

    def fwd_bwd():
        o = attn(q, k, v)
        torch.autograd.grad(o, (q, k, v), do)

    return time_ms(fwd, warmup, reps, CUDA), time_ms(fwd_bwd, warmup, reps, CUDA)


def guarded(fn: Callable[[], tuple[float, float]], any_error: bool = False) -> tuple[float, float] | str:
    """Timings, or why there are none. any_error: for third-party code (fla may not run on this
    triton: block pointers were removed in triton 3.9), whose failure should not end the run."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as e:
        if not any_error:
            raise
        torch.cuda.empty_cache()
        return f"error: {type(e).__name__}: {str(e)[:200]}"


def bench_prefill(fla_chunk, seq_lens, batch_heads) -> list[dict]:
    from xinzhou.ops.lightning import lightning_attention

    rows = []
    for B, H in batch_heads:
        slopes = alibi_slopes(H, DEVICE)
        for T in seq_lens:
            torch.cuda.empty_cache()
            row: dict = {"B": B, "H": H, "T": T, "D": D}
            try:
                q, k, v, do = (torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
            except torch.cuda.OutOfMemoryError:
                row["xinzhou"] = row["fla"] = row["sdpa"] = "OOM"
                rows.append(row)
                continue
            for x in (q, k, v):
                x.requires_grad_()
            warmup, reps = reps_for(T, B, H)
            row["xinzhou"] = guarded(lambda: fwd_and_fwdbwd(
                lambda a, b, c: lightning_attention(a, b, c, slopes, backend="triton")[0], q, k, v, do, warmup, reps))
            if fla_chunk is None:
                row["fla"] = "fla not installed"
            else:
                row["fla"] = guarded(lambda: fwd_and_fwdbwd(
                    lambda a, b, c: fla_chunk(a, b, c, g_gamma=-slopes, scale=1.0)[0], q, k, v, do, warmup, reps),
                    any_error=True)
            if T > SDPA_MAX_T:
                row["sdpa"] = "skipped"
            else:
                def sdpa(a, b, c):  # [B, T, H, D] -> [B, H, T, D] and back
                    o = torch.nn.functional.scaled_dot_product_attention(
                        a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), is_causal=True)
                    return o.transpose(1, 2)
                row["sdpa"] = guarded(lambda: fwd_and_fwdbwd(sdpa, q, k, v, do, warmup, reps))
            del q, k, v, do
            rows.append(row)
            print(format_prefill_row(row), flush=True)
    return rows


def copy_bandwidth_bytes_per_ms() -> float:
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), 5, 20, CUDA)
    return 2 * x.numel() / ms  # read + write


def bench_decode(fla_recurrent, batches) -> list[dict]:
    from xinzhou.ops.lightning import lightning_decode

    bandwidth = copy_bandwidth_bytes_per_ms()
    H = DECODE_HEADS
    slopes = alibi_slopes(H, DEVICE)
    rows = []
    for B in batches:
        q, k, v = (torch.randn(B, H, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
        state = torch.randn(B, H, D, D, device=DEVICE, dtype=torch.float32)
        floor_us = 1e3 * 2 * state.numel() * 4 / bandwidth
        row: dict = {"B": B, "H": H, "D": D, "floor_us": floor_us}
        row["xinzhou_us"] = 1e3 * time_ms(lambda: lightning_decode(q, k, v, slopes, state, backend="triton"), 10, 100, CUDA)
        if fla_recurrent is None:
            row["fla_us"] = "fla not installed"
        else:
            q1, k1, v1 = (x[:, None] for x in (q, k, v))  # [B, 1, H, D]
            fla_ms = guarded(lambda: (time_ms(lambda: fla_recurrent(
                q1, k1, v1, g_gamma=-slopes, scale=1.0, initial_state=state, output_final_state=True), 10, 100, CUDA),),
                any_error=True)
            row["fla_us"] = 1e3 * fla_ms[0] if isinstance(fla_ms, tuple) else fla_ms
        rows.append(row)
        print(format_decode_row(row), flush=True)
    return rows


def check_accuracy(fla_chunk) -> dict:
    """Relative error of bf16 kernels (outputs and gradients) against fp32 math on the same inputs."""
    from xinzhou.ops.lightning import lightning_attention
    from xinzhou.ops.lightning_ref import lightning_blockwise

    B, T, H = 1, 4096, 4
    slopes = alibi_slopes(H, DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    # silu'd inputs like the model's, scaled so the bf16 output stays well inside range
    q, k, v = (torch.nn.functional.silu(torch.randn(B, T, H, D, device=DEVICE, generator=gen)).mul(0.25)
               .bfloat16().requires_grad_() for _ in range(3))
    do = torch.randn(B, T, H, D, device=DEVICE, generator=gen).bfloat16()
    leaves = (q, k, v)
    leaves_fp32 = tuple(x.detach().float().requires_grad_() for x in leaves)
    o_ref, _ = lightning_blockwise(*leaves_fp32, slopes)
    g_ref = torch.autograd.grad(o_ref, leaves_fp32, do.float())

    def rel(x, ref):
        return ((x.float() - ref.float()).norm() / ref.float().norm()).item()

    out = {"shape": {"B": B, "T": T, "H": H, "D": D}}
    candidates = {"xinzhou": lambda: lightning_attention(*leaves, slopes, backend="triton")[0]}
    if fla_chunk is not None:
        candidates["fla"] = lambda: fla_chunk(*leaves, g_gamma=-slopes, scale=1.0)[0]
    for name, fn in candidates.items():
        try:
            o = fn()
            g = torch.autograd.grad(o, leaves, do)
        except Exception as e:
            if name == "xinzhou":
                raise
            out[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
            continue
        out[name] = {"o": rel(o, o_ref), **{f"d{n}": rel(a, b) for n, a, b in zip("qkv", g, g_ref)}}
    return out


def fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:8.3f}"
    return f"{'n/a' if x == 'fla not installed' else 'error' if x.startswith('error') else x:>8}"


def ratio(a, b) -> str:
    return f"{a / b:6.2f}x" if isinstance(a, float) and isinstance(b, float) else "      -"


def format_prefill_row(r: dict) -> str:
    parts = [f"B={r['B']:<2} H={r['H']:<3} T={r['T']:<7}"]
    for i, kind in enumerate(("fwd", "fwd+bwd")):
        get = [(r[n][i] if isinstance(r[n], tuple) else r[n]) for n in ("xinzhou", "fla", "sdpa")]
        parts.append(f"{kind}: xz {fmt(get[0])} fla {fmt(get[1])} sdpa {fmt(get[2])} "
                     f"fla/xz {ratio(get[1], get[0])} sdpa/xz {ratio(get[2], get[0])}")
    return " | ".join(parts)


def format_decode_row(r: dict) -> str:
    return (f"decode B={r['B']:<4} H={r['H']} D={r['D']}: xz {fmt(r['xinzhou_us'])} us  fla {fmt(r['fla_us'])} us  "
            f"floor {fmt(r['floor_us'])} us  fla/xz {ratio(r['fla_us'], r['xinzhou_us'])}  "
            f"xz/floor {ratio(r['xinzhou_us'], r['floor_us'])}")


def environment() -> dict:
    import triton

    try:
        import fla
        fla_version = getattr(fla, "__version__", "unknown")
    except ImportError:
        fla_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "fla": fla_version, "git_commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_lightning.py needs a CUDA GPU (Triton kernels on the CPU interpreter are not worth timing)")
    fla_chunk, fla_recurrent = load_fla()
    if fla_chunk is None:
        print("fla not installed: its columns read 'fla not installed'")
    results = {"env": environment()}
    print(json.dumps(results["env"]))
    results["accuracy_vs_fp32"] = check_accuracy(fla_chunk)
    print("relative error vs fp32:", json.dumps(results["accuracy_vs_fp32"]), flush=True)
    results["prefill_ms"] = bench_prefill(fla_chunk, args.seq_lens, BATCH_HEADS)
    if not args.skip_decode:
        results["decode"] = bench_decode(fla_recurrent, DECODE_BATCHES)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
