"""MoE block speed: xinzhou vs transformers' MiniMax sparse MoE block vs a bare grouped_mm floor, one process.

Shape (the anchors in RESULTS.md): N = 8192 tokens, hidden C = 1024, E = 8 experts, top K = 2, expert width
F = 1024, bf16 weights and activations. Each row times the forward (no grad) and the forward +
backward (gradients of the input and of every weight) of one MoE block on the same input:

  xinzhou grouped   router (fp32 logits, `route(..., "softmax")`) + `experts_grouped`: what
                    xinzhou.model.MoE runs, minus its balance-loss statistics
  xinzhou loop      the same router + `experts_loop` (the per-expert reference)
  hf eager          transformers `MiniMaxSparseMoeBlock`, config experts_implementation="eager"
  hf grouped_mm     the same block, experts_implementation="grouped_mm" (transformers 5.x's default)
  floor             no routing math: a stable sort of the N*K precomputed expert ids, the gather of
                    the sorted rows, two `F.grouped_mm` calls with SwiGLU between them, no combine;
                    the counts/offsets are computed once outside the timed call

Before timing, all four blocks run in fp32 on the same weights (copied into transformers' block) and
input: outputs and gradients (input, router, both expert weights) must agree with `experts_loop`
to 1e-3 relative (|a - b| / |b|), or the run stops. Then the same check in the timed dtype against
fp32 math on the same (rounded) weights and inputs is printed; xinzhou's output must be within 5e-2
(transformers computes its router logits in bf16, so near-tie tokens may pick other experts: its
bf16 error is printed, not asserted). On CUDA, xinzhou's grouped path runs fp32 as a per-expert
loop (its grouped_mm call is bf16-only there), so the bf16 check is the one that covers it.

TFLOP/s count the three GEMMs of the SwiGLU per routed token, 2 * 3 * C * F FLOPs each slot, N * K
slots; forward + backward is 3x the forward (the router GEMM, 2 * C * E per token, is left out).
"x hf" is transformers' time over the row's time (above 1 = faster than transformers); "x floor" is
the row's time over the floor row's. The bf16 matmul peak (8192^3, timed in the same process) gives
"% peak" = TFLOP/s over it. Times are medians of CUDA-event-timed calls after warmup.

    python benchmarks/bench_moe.py --out bench_moe.json
    python benchmarks/bench_moe.py --device cpu --smoke --out /tmp/moe.json   # every path, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timing import git_commit, guarded, peak_matmul_tflops, time_ms  # benchmarks/timing.py (scripts run from their folder)

from xinzhou.ops.moe import experts_grouped, experts_loop, route

FP32_TOL = 1e-3
XZ_LOWP_TOL = 5e-2
NAMES = ("xinzhou grouped", "xinzhou loop", "hf eager", "hf grouped_mm", "floor")
HF_IMPLS = {"hf eager": "eager", "hf grouped_mm": "grouped_mm"}


@dataclass(frozen=True)
class Plan:
    tokens: int = 8192
    hidden: int = 1024
    expert_dim: int = 1024
    experts: int = 8
    top_k: int = 2
    reps: tuple[int, int] = (5, 30)  # (warmup, timed)
    matmul_n: int = 8192


PLANS = {
    "full": Plan(),
    # sizes multiples of 8 elements: grouped_mm wants 16-byte aligned strides
    "smoke": Plan(tokens=200, hidden=64, expert_dim=96, experts=4, top_k=2, reps=(1, 2), matmul_n=256),
}


# ----------------------------------------------------------------------------- the blocks

def make_weights(plan: Plan, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 weights in xinzhou's layout: gate [E, C], w13 [E, 2F, C] (w1 rows, then w3), w2 [E, C, F]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    E, C, Fd = plan.experts, plan.hidden, plan.expert_dim
    w = {"gate": torch.randn(E, C, generator=g) / C**0.5,  # logits ~ N(0, 1) for x ~ N(0, 1)
         "w13": torch.randn(E, 2 * Fd, C, generator=g) / C**0.5,
         "w2": torch.randn(E, C, Fd, generator=g) / Fd**0.5}
    return {k: v.to(device) for k, v in w.items()}


class Block:
    """One implementation: leaves (tensors the backward differentiates) and fn(x) -> output."""

    def __init__(self, name: str, leaves: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor],
                 needs_x_grad: bool = True) -> None:
        self.name, self.leaves, self.fn, self.needs_x_grad = name, leaves, fn, needs_x_grad


def xinzhou_block(name: str, w: dict[str, torch.Tensor], k: int) -> Block:
    experts = experts_grouped if name == "xinzhou grouped" else experts_loop
    gate, w13, w2 = (w[n].detach().clone().requires_grad_() for n in ("gate", "w13", "w2"))

    def fn(x: torch.Tensor) -> torch.Tensor:  # as xinzhou.model.MoE.forward (router in fp32)
        logits = F.linear(x.float(), gate.float())
        weights, indices, _ = route(logits, k, "softmax")
        return experts(x, w13, w2, weights, indices)
    return Block(name, [gate, w13, w2], fn)


def hf_block(name: str, w: dict[str, torch.Tensor], plan: Plan) -> Block:
    from transformers.models.minimax.configuration_minimax import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxSparseMoeBlock

    impl = HF_IMPLS[name]
    cfg = MiniMaxConfig(hidden_size=plan.hidden, intermediate_size=plan.expert_dim,
                        num_local_experts=plan.experts, num_experts_per_tok=plan.top_k,
                        router_jitter_noise=0.0, hidden_act="silu", experts_implementation=impl)
    assert cfg._experts_implementation == impl, cfg._experts_implementation
    block = MiniMaxSparseMoeBlock(cfg).to(device=w["gate"].device, dtype=w["gate"].dtype)
    with torch.no_grad():  # same layout as xinzhou: gate_up_proj = [w1; w3] per expert, down_proj = w2
        block.gate.weight.copy_(w["gate"])
        block.experts.gate_up_proj.copy_(w["w13"])
        block.experts.down_proj.copy_(w["w2"])
    block.train()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return block(x[None])[0]
    return Block(name, [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj], fn)


def floor_block(w: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> Block:
    """Sort + gather + two grouped_mm (SwiGLU between); expert ids and offsets come from routing x once."""
    w13, w2 = (w[n].detach().clone().requires_grad_() for n in ("w13", "w2"))
    with torch.no_grad():
        _, indices, _ = route(F.linear(x.float(), w["gate"].float()), k, "softmax")
    flat = indices.reshape(-1)
    offsets = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)

    def fn(x: torch.Tensor) -> torch.Tensor:
        order = torch.sort(flat, stable=True).indices
        xs = x[order // k]
        gate, up = F.grouped_mm(xs, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return F.grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offsets)
    return Block("floor", [w13, w2], fn)


def build(names: tuple[str, ...], w: dict[str, torch.Tensor], plan: Plan, x: torch.Tensor) -> list[Block]:
    blocks = []
    for name in names:
        if name.startswith("xinzhou"):
            blocks.append(xinzhou_block(name, w, plan.top_k))
        elif name.startswith("hf"):
            blocks.append(hf_block(name, w, plan))
        else:
            blocks.append(floor_block(w, x, plan.top_k))
    return blocks


def forward_backward(block: Block, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    y = block.fn(x)
    return y, torch.autograd.grad(y, [x, *block.leaves], dy)


# ----------------------------------------------------------------------------- same function

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_same_function(plan: Plan, device: torch.device, dtype: torch.dtype) -> dict:
    """fp32: every block's output and gradients against experts_loop's (asserted, FP32_TOL); then the
    timed dtype against fp32 math on the same rounded weights and inputs (xinzhou's output asserted)."""
    names = ("xinzhou loop", "xinzhou grouped", "hf eager", "hf grouped_mm")
    fields = ("y", "dx", "dgate", "dw13", "dw2")
    gen = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.randn(plan.tokens, plan.hidden, generator=gen).to(device)
    dy0 = torch.randn(plan.tokens, plan.hidden, generator=gen).to(device)
    out: dict = {}
    for dt in dict.fromkeys((torch.float32, dtype)):  # fp32 first; the timed dtype if different
        w = {k: v.to(dt).float() for k, v in make_weights(plan, device).items()}  # rounded to dt
        x, dy = x0.to(dt).float(), dy0.to(dt).float()
        ref_y, ref_g = forward_backward(xinzhou_block("xinzhou loop", w, plan.top_k), x.clone().requires_grad_(), dy)
        ref = dict(zip(fields, (ref_y, *ref_g)))
        w_dt = {k: v.to(dt) for k, v in w.items()}
        errs = {}
        for block in build(names, w_dt, plan, x.detach().to(dt)):
            xd = x.detach().to(dt).requires_grad_()
            try:
                y, g = forward_backward(block, xd, dy.to(dt))
            except Exception as e:  # transformers' failure is reported; xinzhou's ends the run
                if not block.name.startswith("hf"):
                    raise
                errs[block.name] = f"error: {type(e).__name__}: {str(e)[:200]}"
                print(f"check {block.name}: {errs[block.name]}", flush=True)
                continue
            got = dict(zip(fields, (y, *g)))
            errs[block.name] = {f: rel(got[f], ref[f]) for f in fields}
            if not all(torch.isfinite(t).all() for t in got.values()):
                sys.exit(f"{block.name} gave non-finite outputs or gradients in {dt}")
        label = str(dt).removeprefix("torch.")
        out[label] = errs
        ok = {n: e for n, e in errs.items() if isinstance(e, dict)}
        for name, e in ok.items():
            print(f"check {label:8} {name:16} rel err vs fp32 experts_loop: "
                  + "  ".join(f"{f} {v:.1e}" for f, v in e.items()), flush=True)
        if dt == torch.float32:
            bad = {n: e for n, e in ok.items() if max(e.values()) > FP32_TOL}
            if bad or not any(n.startswith("hf") for n in ok):
                sys.exit(f"fp32 disagreement above {FP32_TOL} (or no transformers block ran): "
                         f"not timing different functions: {bad}")
        else:
            bad = {n: e["y"] for n, e in ok.items() if n.startswith("xinzhou") and e["y"] > XZ_LOWP_TOL}
            if bad:
                sys.exit(f"xinzhou {label} output error above {XZ_LOWP_TOL}: {bad}")
    return out


# ----------------------------------------------------------------------------- timing


def time_block(block: Block, x: torch.Tensor, dy: torch.Tensor, plan: Plan, device: torch.device,
               any_error: bool) -> dict | str:
    def fwd() -> None:
        with torch.no_grad():
            block.fn(x)

    def fwd_bwd() -> None:
        forward_backward(block, x, dy)

    return guarded(lambda: {"fwd_ms": time_ms(fwd, *plan.reps, device), "fwd_bwd_ms": time_ms(fwd_bwd, *plan.reps, device)},
                   device, any_error)


def bench(plan: Plan, device: torch.device, dtype: torch.dtype, peak: float) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(plan.tokens, plan.hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(plan.tokens, plan.hidden, generator=gen).to(device=device, dtype=dtype)
    dy_slots = torch.randn(plan.tokens * plan.top_k, plan.hidden, generator=gen).to(device=device, dtype=dtype)
    w = {k: v.to(dtype) for k, v in make_weights(plan, device).items()}
    fwd_flops = 2 * 3 * plan.hidden * plan.expert_dim * plan.tokens * plan.top_k
    rows = []
    for block in build(NAMES, w, plan, x.detach()):
        r = time_block(block, x, dy_slots if block.name == "floor" else dy, plan, device,
                       any_error=block.name.startswith("hf"))
        row: dict = {"name": block.name, **(r if isinstance(r, dict) else {"fwd_ms": r, "fwd_bwd_ms": r})}
        for kind, mult in (("fwd", 1), ("fwd_bwd", 3)):
            ms = row[f"{kind}_ms"]
            if isinstance(ms, float):
                row[f"{kind}_tflops"] = mult * fwd_flops / ms / 1e9
                row[f"{kind}_peak_frac"] = row[f"{kind}_tflops"] / peak
        rows.append(row)
        del block
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        for kind in ("fwd", "fwd_bwd"):
            ms = row[f"{kind}_ms"]
            for ref, key in (("hf grouped_mm", "x_hf_grouped_mm"), ("hf eager", "x_hf_eager"), ("floor", "x_floor")):
                other = by_name[ref][f"{kind}_ms"]
                ok = isinstance(ms, float) and isinstance(other, float)
                row[f"{kind}_{key}"] = (ms / other if key == "x_floor" else other / ms) if ok else None
    return rows


# ----------------------------------------------------------------------------- report

def format_table(rows: list[dict]) -> str:
    def num(v, f: str) -> str:
        return format(v, f) if isinstance(v, float) else format("-", f[0] + "s")

    def rx(v) -> str:
        return f"{v:7.2f}x" if isinstance(v, float) else f"{'-':>8}"

    head = (f"{'':16} | {'fwd ms':>8} {'TFLOP/s':>8} {'x hf gmm':>8} {'x hf eag':>8} | "
            f"{'fwd+bwd ms':>10} {'TFLOP/s':>8} {'% peak':>6} {'x hf gmm':>8} {'x hf eag':>8} {'x floor':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if not isinstance(r["fwd_ms"], float) and not isinstance(r["fwd_bwd_ms"], float):
            lines.append(f"{r['name']:16} | {r['fwd_ms']}")
            continue
        pk = r.get("fwd_bwd_peak_frac")
        lines.append(
            f"{r['name']:16} | {num(r['fwd_ms'], '8.3f')} {num(r.get('fwd_tflops'), '8.1f')} "
            f"{rx(r['fwd_x_hf_grouped_mm'])} {rx(r['fwd_x_hf_eager'])} | "
            f"{num(r['fwd_bwd_ms'], '10.3f')} {num(r.get('fwd_bwd_tflops'), '8.1f')} "
            f"{num(100 * pk if pk is not None else None, '6.1f')} {rx(r['fwd_bwd_x_hf_grouped_mm'])} "
            f"{rx(r['fwd_bwd_x_hf_eager'])} {rx(r['fwd_bwd_x_floor'])[1:]}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    import transformers

    commit = git_commit()
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "git_commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks every code path")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="timed dtype")
    parser.add_argument("--tokens", type=int, default=None, help="override the plan's token count")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU; on a CPU only `--device cpu --smoke` runs")
    if args.device == "cpu" and not args.smoke:
        sys.exit("--device cpu is only for --smoke: CPU timings of the full shape say nothing")
    if not hasattr(F, "grouped_mm"):
        sys.exit(f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (needs torch >= 2.10)")
    plan = PLANS["smoke" if args.smoke else "full"]
    if args.tokens is not None:
        plan = Plan(**{**asdict(plan), "tokens": args.tokens})
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    import transformers
    transformers.logging.set_verbosity_error()

    results: dict = {"env": environment(device), "plan": asdict(plan), "dtype": args.dtype}
    print(json.dumps(results["env"]), flush=True)
    results["check"] = check_same_function(plan, device, dtype)
    results["peak_matmul_tflops"] = peak = peak_matmul_tflops(plan.matmul_n, device)
    print(f"peak bf16 matmul {plan.matmul_n}^3: {peak:.1f} TFLOP/s", flush=True)
    results["rows"] = rows = bench(plan, device, dtype, peak)
    print(f"MoE block, {plan.tokens} tokens, {plan.experts} experts top-{plan.top_k}, "
          f"{plan.hidden} -> {plan.expert_dim}, {args.dtype}, {device.type}")
    print(format_table(rows))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
