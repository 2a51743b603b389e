"""Lightning attention speed on the GPU: xinzhou Triton vs fla `chunk_simple_gla` vs torch SDPA causal.

Times forward and forward+backward (bf16, D = 128) for T in {2K, 8K, 32K, 128K} and (B, H) in
{(1, 16), (4, 32)}, a decode step at batch 1 / 64 / 256 (H = 16) against the fp32 state read+write
floor, and checks the relative error of the bf16 kernels against an fp32 reference at one shape.
Timings are medians of CUDA-event-timed calls; the anchors (fla, SDPA, a device copy, a bf16 matmul)
run in the same process, so quote the ratios. fla's MiniMax-exact call is chunk_simple_gla(q, k, v,
g_gamma=-slopes, scale=1.0) (fla's chunk_lightning_attn has another decay and a 1/sqrt(D) scale).

Floors of the prefill rows (per shape, for the chunked algorithm xinzhou and fla both run), with
chunk C = 64, head dim D, and n = B * T * H token-heads:
  FLOPs, forward   n * 2 * (C*D + D*D + C*D + D*D) = n * 4 * D * (C + D)
                   per token and head: Q K^T over its whole C-key chunk block (C*D multiply-adds),
                   P V (C*D), q S with the carried state (D*D), its share of the k^T v state update
                   (D*D); the causal mask and the decay factors are not discounted or counted
  FLOPs, fwd+bwd   3x the forward (the backward is about twice the forward)
  bytes, forward   4 * n * D * 2       q, k, v read and o written once, bf16
  bytes, fwd+bwd   (4 + 7) * n * D * 2 the forward's, plus q, k, v, do read and dq, dk, dv written
  floor            max(FLOPs / peak, bytes / bandwidth); peak = a bf16 8192^3 matmul, bandwidth = a
                   256 MiB device-to-device copy (bytes read + written), both timed in this run
"x floor" is a measured time over its floor. The decode floor is the fp32 state read + write.

    python benchmarks/bench_lightning.py --out bench_lightning.json
    python benchmarks/bench_lightning.py --device cpu --smoke --out /tmp/l.json  # every path, tiny
        shapes, Triton on the CPU interpreter (TRITON_INTERPRET=1, set here before triton loads)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from timing import copy_bandwidth_bytes_per_ms, git_commit, guarded, peak_matmul_tflops, time_ms  # benchmarks/timing.py

CHUNK = 64  # the chunk length of xinzhou's Triton kernels and of fla's chunk_simple_gla


@dataclass(frozen=True)
class Plan:
    d: int = 128
    seq_lens: tuple[int, ...] = (2048, 8192, 32768, 131072)
    batch_heads: tuple[tuple[int, int], ...] = ((1, 16), (4, 32))
    decode_batches: tuple[int, ...] = (1, 64, 256)
    decode_heads: int = 16
    decode_reps: tuple[int, int] = (10, 100)
    sdpa_max_t: int = 32768  # SDPA causal at 128K takes ~0.5 s per fwd+bwd for B=1, H=16: not worth the minutes
    accuracy_shape: tuple[int, int, int] = (1, 4096, 4)  # (B, T, H)
    matmul_n: int = 8192
    copy_mib: int = 256
    smoke: bool = False


PLANS = {
    "full": Plan(),
    # the CPU interpreter is slow: small D, short T; T = 130 > sdpa_max_t exercises the "skipped" cells
    "smoke": Plan(d=32, seq_lens=(64, 130), batch_heads=((1, 2),), decode_batches=(1, 2), decode_heads=2,
                  decode_reps=(1, 2), sdpa_max_t=64, accuracy_shape=(1, 100, 2), matmul_n=256, copy_mib=4,
                  smoke=True),
}
PLAN = PLANS["full"]
DEVICE = torch.device("cuda")


def alibi_slopes(H: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], device=device)


def reps_for(T: int, B: int, H: int) -> tuple[int, int]:
    if PLAN.smoke:
        return 1, 2
    work = T * B * H / (2048 * 16)
    return (3, 5) if work >= 256 else (5, 20) if work >= 16 else (10, 50)


def empty_cache() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def load_fla():
    """fla's two kernels, or (None, None) and why not (a missing package, or one that fails to import)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError as e:
        return None, None, f"not installed ({e})"
    except Exception as e:  # noqa: BLE001 - an installed fla that fails to import on this torch/triton: say so, go on
        return None, None, f"import failed: {type(e).__name__}: {str(e)[:200]}"
    return chunk_simple_gla, fused_recurrent_simple_gla, None


def fwd_and_fwdbwd(attn: Callable, q, k, v, do, warmup: int, reps: int) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            return attn(q, k, v)

    def fwd_bwd():
        o = attn(q, k, v)
        torch.autograd.grad(o, (q, k, v), do)

    return time_ms(fwd, warmup, reps, DEVICE), time_ms(fwd_bwd, warmup, reps, DEVICE)



def prefill_floors(B: int, T: int, H: int, peak_tflops: float, bytes_per_ms: float) -> dict:
    """FLOP and byte floors (ms) of forward and forward+backward; see the module docstring."""
    D = PLAN.d
    n = B * T * H
    fwd_flops = n * 2 * (CHUNK * D + D * D + CHUNK * D + D * D)
    out = {}
    for kind, flops, tensors in (("fwd", fwd_flops, 4), ("fwd+bwd", 3 * fwd_flops, 4 + 7)):
        nbytes = tensors * n * D * 2  # bf16
        flop_ms, byte_ms = flops / (peak_tflops * 1e9), nbytes / bytes_per_ms
        out[kind] = {"flops": flops, "bytes": nbytes, "flop_ms": flop_ms, "byte_ms": byte_ms,
                     "floor_ms": max(flop_ms, byte_ms), "bound": "bytes" if byte_ms >= flop_ms else "flops"}
    return out


def bench_prefill(fla_chunk, fla_missing: str | None, seq_lens, batch_heads, peak_tflops: float,
                  bytes_per_ms: float, rows: list[dict], save: Callable[[], None]) -> list[dict]:
    """Appends one row per shape to rows, calling save() after each (a run cut short keeps its rows)."""
    for B, H in batch_heads:
        slopes = alibi_slopes(H, DEVICE)
        for T in seq_lens:
            empty_cache()
            row: dict = {"B": B, "H": H, "T": T, "D": PLAN.d,
                         "floors": prefill_floors(B, T, H, peak_tflops, bytes_per_ms)}
            try:
                row.update(prefill_times(B, T, H, slopes, fla_chunk, fla_missing))
            except torch.OutOfMemoryError:  # the inputs themselves did not fit
                row["xinzhou"] = row["fla"] = row["sdpa"] = "OOM"
            add_x_floor(row)
            rows.append(row)
            save()
            print(format_prefill_row(row), flush=True)
    return rows


def prefill_times(B: int, T: int, H: int, slopes: torch.Tensor, fla_chunk, fla_missing: str | None) -> dict:
    """{"xinzhou", "fla", "sdpa"}: (fwd ms, fwd+bwd ms) each, or why there is no time."""
    from xinzhou.ops.lightning import lightning_attention

    q, k, v, do = (torch.randn(B, T, H, PLAN.d, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    warmup, reps = reps_for(T, B, H)

    def timed(attn: Callable) -> Callable[[], tuple[float, float]]:
        return lambda: fwd_and_fwdbwd(attn, q, k, v, do, warmup, reps)

    def sdpa(a, b, c):  # [B, T, H, D] -> [B, H, T, D] and back
        o = torch.nn.functional.scaled_dot_product_attention(
            a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2)

    out: dict = {"xinzhou": guarded(timed(lambda a, b, c: lightning_attention(a, b, c, slopes, backend="triton")[0]), DEVICE)}
    if fla_chunk is None:
        out["fla"] = f"fla {fla_missing}"
    else:
        out["fla"] = guarded(timed(lambda a, b, c: fla_chunk(a, b, c, g_gamma=-slopes, scale=1.0)[0]), DEVICE, any_error=True)
    out["sdpa"] = "skipped" if T > PLAN.sdpa_max_t else guarded(timed(sdpa), DEVICE)
    return out


def add_x_floor(row: dict) -> None:
    """row["x_floor"][name] = [fwd, fwd+bwd] measured time over its floor (None where not timed)."""
    row["x_floor"] = {}
    for name in ("xinzhou", "fla"):
        r = row[name]
        row["x_floor"][name] = [r[i] / row["floors"][kind]["floor_ms"] if isinstance(r, tuple) else None
                                for i, kind in enumerate(("fwd", "fwd+bwd"))]




def bench_decode(fla_recurrent, fla_missing: str | None, batches, bandwidth: float) -> list[dict]:
    D, H = PLAN.d, PLAN.decode_heads
    slopes = alibi_slopes(H, DEVICE)
    rows = []
    for B in batches:
        row = {"B": B, "H": H, "D": D, "floor_us": 1e3 * 2 * B * H * D * D * 4 / bandwidth,  # fp32 state r+w
               **decode_times(B, H, slopes, fla_recurrent, fla_missing)}
        rows.append(row)
        print(format_decode_row(row), flush=True)
    return rows


def decode_times(B: int, H: int, slopes: torch.Tensor, fla_recurrent, fla_missing: str | None) -> dict:
    """One decode step, us: xinzhou's (state updated in place) and fla's fused_recurrent_simple_gla."""
    from xinzhou.ops.lightning import lightning_decode

    D = PLAN.d
    q, k, v = (torch.randn(B, H, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(B, H, D, D, device=DEVICE, dtype=torch.float32)
    out: dict = {"xinzhou_us": 1e3 * time_ms(lambda: lightning_decode(q, k, v, slopes, state, backend="triton"),
                                             *PLAN.decode_reps, DEVICE)}
    if fla_recurrent is None:
        out["fla_us"] = f"fla {fla_missing}"
        return out
    q1, k1, v1 = (x[:, None] for x in (q, k, v))  # [B, 1, H, D]

    def fla_step() -> None:
        fla_recurrent(q1, k1, v1, g_gamma=-slopes, scale=1.0, initial_state=state, output_final_state=True)

    fla_ms = guarded(lambda: (time_ms(fla_step, *PLAN.decode_reps, DEVICE),), DEVICE, any_error=True)
    out["fla_us"] = 1e3 * fla_ms[0] if isinstance(fla_ms, tuple) else fla_ms
    return out


def check_accuracy(fla_chunk) -> dict:
    """Relative error of bf16 kernels (outputs and gradients) against fp32 math on the same inputs."""
    from xinzhou.ops.lightning import lightning_attention
    from xinzhou.ops.lightning_ref import lightning_blockwise

    B, T, H = PLAN.accuracy_shape
    D = PLAN.d
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
    return f"{'n/a' if x.startswith('fla ') else 'error' if x.startswith('error') else x:>8}"


def ratio(a, b) -> str:
    return f"{a / b:6.2f}x" if isinstance(a, float) and isinstance(b, float) else "      -"


def times(x: float | None) -> str:
    return f"{x:6.1f}x" if isinstance(x, float) else "      -"


def format_prefill_row(r: dict) -> str:
    parts = [f"B={r['B']:<2} H={r['H']:<3} T={r['T']:<7}"]
    for i, kind in enumerate(("fwd", "fwd+bwd")):
        get = [(r[n][i] if isinstance(r[n], tuple) else r[n]) for n in ("xinzhou", "fla", "sdpa")]
        fl = r["floors"][kind]
        parts.append(f"{kind}: xz {fmt(get[0])} fla {fmt(get[1])} sdpa {fmt(get[2])} "
                     f"fla/xz {ratio(get[1], get[0])} sdpa/xz {ratio(get[2], get[0])} "
                     f"floor {fl['floor_ms']:.3f} ({fl['bound']}) x floor: xz {times(r['x_floor']['xinzhou'][i])} "
                     f"fla {times(r['x_floor']['fla'][i])}")
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
    except Exception:  # noqa: BLE001 - missing, or failing to import (load_fla says which)
        fla_version = None
    commit = git_commit()
    return {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "fla": fla_version, "git_commit": commit,
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}


def main() -> None:
    global PLAN, DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes: checks every code path (with --device cpu: on the Triton interpreter)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="override the plan's T values")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_lightning.py needs a CUDA GPU; on a CPU only `--device cpu --smoke` runs (Triton kernels "
                 "on the CPU interpreter are not worth timing)")
    if args.device == "cpu":
        if not args.smoke:
            sys.exit("--device cpu is only for --smoke")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    PLAN = PLANS["smoke" if args.smoke else "full"]
    DEVICE = torch.device(args.device)
    seq_lens = tuple(args.seq_lens) if args.seq_lens else PLAN.seq_lens
    fla_chunk, fla_recurrent, fla_missing = load_fla()
    if fla_chunk is None:
        print(f"fla {fla_missing}: its columns read n/a")
    results: dict = {"env": environment(), "plan": asdict(PLAN), "fla_missing": fla_missing, "complete": False}

    def save() -> None:  # after every step: a run stopped by a time limit keeps what it measured
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    print(json.dumps(results["env"]))
    results["accuracy_vs_fp32"] = check_accuracy(fla_chunk)
    save()
    print("relative error vs fp32:", json.dumps(results["accuracy_vs_fp32"]), flush=True)
    results["peak_matmul_tflops"] = peak = peak_matmul_tflops(PLAN.matmul_n, DEVICE)
    bandwidth = copy_bandwidth_bytes_per_ms(PLAN.copy_mib, DEVICE)
    results["copy_bandwidth_tb_s"] = bandwidth * 1e3 / 1e12
    print(f"peak bf16 matmul {PLAN.matmul_n}^3: {peak:.1f} TFLOP/s; device copy {PLAN.copy_mib} MiB: "
          f"{results['copy_bandwidth_tb_s']:.3f} TB/s (read + write)", flush=True)
    results["prefill_ms"] = []
    bench_prefill(fla_chunk, fla_missing, seq_lens, PLAN.batch_heads, peak, bandwidth, results["prefill_ms"], save)
    if not args.skip_decode:
        results["decode"] = bench_decode(fla_recurrent, fla_missing, PLAN.decode_batches, bandwidth)
    results["complete"] = True
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
