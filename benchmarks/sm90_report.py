"""Compile the Triton lightning kernels for the H100 (sm_90a) on any machine, no GPU needed, and report
per launch config: registers, spilled bytes, shared memory, and whether the matmuls use Hopper's
wgmma. Spills and shared memory over the 227 KiB a block may have are what to look for before a GPU
session; the timings still need the GPU.

    python benchmarks/sm90_report.py [--dtype bf16] [--head-dim 128] [--quick] [--out report.json]

Uses triton's own ptxas (`ptxas -v`), the same one a GPU compile uses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # the real configs, not the interpreter's

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from xinzhou.ops import lightning_triton as lt  # noqa: E402
from xinzhou.ops import cross_entropy_triton, norm_triton, swiglu_triton  # noqa: E402

SMEM_LIMIT = 227 * 1024
FP32_POINTERS = {"slopes", "h0", "sums", "ht", "dht", "dh0", "state", "out", "rstd", "dw_part", "loss"}
INT_POINTERS = {"cu_seqlens", "seg_offsets", "seg_seq"}
SCALARS = {"T": "i32", "SEG": "i32", "TUNE": "i32", "N": "i32", "M": "i32", "ROWS": "i32", "eps": "fp32",
           "V": "i32", "stride": "i32", "ignore_index": "i32", "n": "i32", "F": "i32"}
INT_ALIGNED = ("T", "SEG")  # multiples of 16 at the benchmark shapes


def kernels(dtype: str, D: int) -> list[tuple[str, object, dict]]:
    """(name, kernel, constexprs other than the autotuned blocks) for the training-shape launches:
    fixed-length and segmented, with an initial state and final state, as a training step runs them."""
    p2 = lt._p2(D)
    common = dict(H=16, K=D, V=D, BT=lt.BT, SEGMENTED=True, IS_VARLEN=False, PREC=None)
    return [
        ("segment_sum (k, v)", lt._segment_sum_kernel,
         dict(H=16, DX=D, DY=D, BT=lt.BT, REVERSE=False, IS_VARLEN=False, PREC=None)),
        ("fwd", lt._fwd_kernel, dict(common, KP=p2, USE_H0=True, STORE_HT=True)),
        ("bwd_dq", lt._bwd_dq_kernel, dict(common, VP=p2, USE_H0=True)),
        ("bwd_dk", lt._bwd_dk_kernel, dict(common, VP=p2, USE_GT=True, STORE_DH0=True)),
        ("bwd_dv", lt._bwd_dv_kernel, dict(common, KP=p2, USE_GT=True)),
        ("rms_norm fwd (N=1024)", norm_triton._fwd_kernel, {"BLOCK_N": 1024}),
        ("rms_norm bwd (N=1024)", norm_triton._bwd_kernel, {"BLOCK_N": 1024}),
        ("cross_entropy", cross_entropy_triton._ce_kernel, {"BLOCK": 4096, "STORE_GRAD": True}),
        ("swiglu fwd", swiglu_triton._fwd_kernel, {"BLOCK": swiglu_triton.BLOCK}),
        ("swiglu bwd", swiglu_triton._bwd_kernel, {"BLOCK": swiglu_triton.BLOCK}),
    ]


def signature(fn, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in SCALARS:
            sig[name] = SCALARS[name]
        elif name in INT_POINTERS:
            sig[name] = "*i32"
        elif name == "targets":
            sig[name] = "*i64"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        else:
            sig[name] = f"*{dtype}"
    return sig


def aligned(fn, sig: dict) -> dict:
    """What a launch on real tensors tells the compiler: pointers 16-byte aligned, T and SEG multiples
    of 16 (T = 2K..128K, SEG a multiple of 64). Without it loads are not vectorised."""
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in sig.items()
            if kind.startswith("*") or name in INT_ALIGNED}


def ptxas_report(ptx: str) -> dict:
    ptxas = get_ptxas(90).path  # the ptxas triton itself uses for sm_90
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill_st.group(1)) if spill_st else 0,
            "spill_loads": int(spill_ld.group(1)) if spill_ld else 0,
            "stack_frame": int(stack.group(1)) if stack else 0}


def compile_config(fn, constexprs: dict, config: triton.Config, dtype: str) -> dict:
    consts = {**constexprs, **config.kwargs}
    sig = signature(fn, consts, dtype)
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=aligned(fn, sig))
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    ptx = compiled.asm["ptx"]
    return {**ptxas_report(ptx), "shared_bytes": compiled.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
            "mma_sync": ptx.count("mma.sync")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--quick", action="store_true", help="one config per kernel: the first with 8 warps, 2 stages")
    args = parser.parse_args()
    rows = []
    print(f"triton {triton.__version__}, sm_90a, {args.dtype}, D = {args.head_dim}")
    print(f"{'kernel':20} {'config':34} {'regs':>5} {'spill':>6} {'smem KiB':>9} {'wgmma':>6}  note")
    for name, kernel, consts in kernels(args.dtype, args.head_dim):
        named = {**consts, "K": args.head_dim, "V": args.head_dim, "DX": args.head_dim, "DY": args.head_dim}
        if not hasattr(kernel, "configs"):  # not autotuned: the launch config its module uses
            warps = norm_triton._warps(consts["BLOCK_N"]) if "BLOCK_N" in consts else \
                4 if name.startswith("swiglu") else 8
            configs, fn = [triton.Config({}, num_warps=warps, num_stages=1)], kernel
        else:
            prune = getattr(kernel, "early_config_prune", None)
            configs, fn = (prune(kernel.configs, named) if prune else kernel.configs), kernel.fn
        if args.quick:
            configs = [c for c in configs if (c.num_warps, c.num_stages) == (8, 2)][:1] or configs[:1]
        for config in configs:
            cfg = f"{config.kwargs} w{config.num_warps} s{config.num_stages}"
            try:
                r = compile_config(fn, consts, config, args.dtype)
            except Exception as e:  # a config that does not compile is a finding, not a crash
                rows.append({"kernel": name, "config": cfg, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"{name:20} {cfg:34} compile error: {rows[-1]['error'][:80]}")
                continue
            note = ("SPILLS " if r["spill_stores"] else "") + ("SMEM>227K " if r["shared_bytes"] > SMEM_LIMIT else "")
            rows.append({"kernel": name, "config": cfg, **r})
            print(f"{name:20} {cfg:34} {r['registers']:>5} {r['spill_stores']:>6} {r['shared_bytes'] / 1024:>9.1f} "
                  f"{r['wgmma']:>6}  {note}")
    if args.out:
        Path(args.out).write_text(json.dumps({"triton": triton.__version__, "dtype": args.dtype,
                                              "head_dim": args.head_dim, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
