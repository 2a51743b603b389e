"""Whole-model speed: xinzhou vs transformers' MiniMaxForCausalLM, same config and weights, one process.

The `small` preset (306.8M params, the shape of the anchors in RESULTS.md) is built as an XinzhouLM, written
with `save_hf` and read back by `transformers.AutoModelForCausalLM.from_pretrained`. Both run in
fp32 first: their logits must agree (max |diff| printed; the run stops if they do not), then both
are cast to bf16 (a bf16 model, no autocast; AdamW states are bf16 too) and timed:

1. training step (forward + loss + backward + AdamW step) tokens/s and MFU at (B, T) = (4, 2048), (1, 8192);
2. prefill (no grad, no cache) tokens/s and peak memory at T = 8K, 32K, 128K, B = 1, head on the last
   position only (transformers: `logits_to_keep=1`; xinzhou: a forward hook slices the final norm's
   output to the last position, so the head runs on one token);
3. decode: `xinzhou.engine.generate` vs transformers `generate`, greedy, 512-token prompt, 64 new
   tokens, batch 1 and 16; tokens/s = B * 64 / time of the whole call (prefill included).

Only one model is on the GPU while it is timed (the other waits on the CPU), so peak memory
(torch.cuda.max_memory_allocated, weights included) is that model's alone. Times are medians of
CUDA-event-timed calls after warmup. MFU = model FLOPs per token * tokens/s / peak, the peak being a
bf16 8192^3 matmul timed in the same run. Model FLOPs per token (forward; training = 3x forward):
  2 * (cfg.num_params(active=True) + vocab * hidden)   matmuls with the top-k experts' weights and the
                                                       LM head (the embedding lookup is no matmul; the
                                                       norm weights counted in num_params are < 0.01%)
  softmax layer:    2 * H * D * (T + 1)                causal QK^T and PV, (T + 1) / 2 keys on average
  lightning layer:  2 * H * D * (C + 1) + 4 * H * D^2  chunked linear attention, chunk C = 64: causal
                                                       QK^T and PV inside a chunk, q.S and the k^T v
                                                       state update
Prefill MFU leaves the head out (it runs on one position).

    python benchmarks/bench_model.py --out bench_model.json                  # full run
    python benchmarks/bench_model.py --quick --out bench_model.json          # fewer shapes
    python benchmarks/bench_model.py --device cpu --smoke --out /tmp/s.json  # every path, tiny shapes, CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timing import git_commit, peak_matmul_tflops, time_ms  # benchmarks/timing.py (scripts run from their folder)
import torch.nn.functional as F
from torch import nn

from xinzhou.config import ModelConfig, preset
from xinzhou.engine import SamplingConfig, generate
from xinzhou.hf import save_hf
from xinzhou.model import XinzhouLM

LIGHTNING_CHUNK = 64  # the Triton kernel's chunk length (xinzhou/ops/lightning_triton.py BT); fla's is 64 too
GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class Plan:
    preset: str
    overrides: dict = field(default_factory=dict)
    check_shape: tuple[int, int] = (2, 300)  # (B, T): T crosses the 256 block and 64 chunk boundaries
    train_shapes: tuple[tuple[int, int], ...] = ((4, 2048), (1, 8192))
    prefill_lens: tuple[int, ...] = (8192, 32768, 131072)
    decode_batches: tuple[int, ...] = (1, 16)
    prompt_len: int = 512
    new_tokens: int = 64
    matmul_n: int = 8192
    train_reps: tuple[int, int] = (3, 10)  # (warmup, timed)
    prefill_reps: tuple[int, int] = (1, 5)
    decode_reps: tuple[int, int] = (1, 3)


PLANS = {
    "full": Plan(preset="small"),
    "quick": Plan(preset="small", prefill_lens=(8192, 32768), decode_reps=(1, 2)),  # both training targets
    # rotary_dim = head_dim: transformers' MiniMax rotates the whole head (tiny's default rotates half)
    "smoke": Plan(preset="tiny", overrides=dict(rotary_dim=16), check_shape=(2, 100), train_shapes=((2, 64),),
                  prefill_lens=(64, 128), decode_batches=(1, 2), prompt_len=16, new_tokens=4, matmul_n=256,
                  train_reps=(1, 2), prefill_reps=(1, 2), decode_reps=(1, 2)),
}


# ----------------------------------------------------------------------------- timing and memory

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def resident(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model on the device for the duration (and nothing else of ours there); back on the CPU after."""
    model.to(device)
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        yield model
    finally:
        model.zero_grad(set_to_none=True)
        model.to("cpu")
        free_memory(device)


def timed_case(model: nn.Module, device: torch.device, make: Callable[[nn.Module], Callable[[], object]],
               reps: tuple[int, int]) -> dict | str:
    """{"ms", "peak_gib"} for the callable make(model) builds, with the model resident; "OOM" if it runs out."""
    try:
        with resident(model, device):
            fn = make(model)
            ms = time_ms(fn, *reps, device)
            peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
            del fn
        return {"ms": ms, "peak_gib": peak}
    except torch.OutOfMemoryError:
        pass
    free_memory(device)  # outside the handler: its traceback no longer holds the failed call's tensors
    return "OOM"



def flops_per_token(cfg: ModelConfig, T: int, head: bool) -> int:
    """Forward FLOPs per token at context T (see the module docstring); training is 3x this."""
    H, D = cfg.num_heads, cfg.head_dim
    total = 2 * (cfg.num_params(active=True) + (cfg.vocab_size * cfg.hidden_size if head else 0))
    for kind in cfg.layer_types:
        if kind == "softmax":
            total += 2 * H * D * (T + 1)
        else:
            total += 2 * H * D * (min(LIGHTNING_CHUNK, T) + 1) + 4 * H * D * D
    return total


# ----------------------------------------------------------------------------- models

def build_pair(cfg: ModelConfig, device: torch.device, hf_kwargs: dict) -> tuple[XinzhouLM, nn.Module]:
    """xinzhou model with random weights and transformers' model loaded from its save_hf checkpoint, fp32, on CPU."""
    import transformers

    # its load report lists the lightning decay buffers as MISSING: they are derived and rebuilt from
    # the config in __init__ (save_hf leaves them out); the fp32 logit check below is the real test
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU is much faster than on the CPU
        xz = XinzhouLM(cfg)
    xz.to("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(xz, Path(tmp) / "ckpt")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "ckpt", dtype=torch.float32, **hf_kwargs)
    return xz, hf


@torch.no_grad()
def compare_logits(xz: XinzhouLM, hf: nn.Module, shape: tuple[int, int], device: torch.device) -> dict:
    """Max |logit diff| and CE loss of both models on random tokens (both models must be on the device)."""
    xz.eval()
    hf.eval()
    V = xz.config.vocab_size
    ids = torch.randint(0, V, shape, device=device, generator=torch.Generator(device).manual_seed(1))
    a = xz(ids)
    b = hf(input_ids=ids, use_cache=False).logits.float()
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)  # hf shifts labels itself
    ce_xz = F.cross_entropy(a.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    ce_hf = hf(input_ids=ids, labels=ids, use_cache=False).loss
    return {"B": shape[0], "T": shape[1], "max_abs_diff": (a - b).abs().max().item(),
            "max_abs_logit": b.abs().max().item(), "ce_xinzhou": ce_xz.item(), "ce_transformers": ce_hf.item()}


def check_same_function(xz: XinzhouLM, hf: nn.Module, shape: tuple[int, int], device: torch.device) -> dict:
    """fp32 then bf16 logit comparison; leaves both models bf16 on the CPU. Exits if fp32 disagrees."""
    out = {}
    with resident(xz, device), resident(hf, device):
        out["fp32"] = compare_logits(xz, hf, shape, device)
        xz.to(torch.bfloat16)
        hf.to(torch.bfloat16)
        out["bf16"] = compare_logits(xz, hf, shape, device)
    for kind in ("fp32", "bf16"):
        r = out[kind]
        print(f"logits {kind} B={r['B']} T={r['T']}: max |xinzhou - transformers| = {r['max_abs_diff']:.3g} "
              f"(max |logit| {r['max_abs_logit']:.3g}); CE {r['ce_xinzhou']:.5f} vs {r['ce_transformers']:.5f}",
              flush=True)
    fp32 = out["fp32"]
    if fp32["max_abs_diff"] > 1e-3 * fp32["max_abs_logit"]:
        sys.exit("xinzhou and transformers disagree in fp32: not timing two different functions")
    return out


# ----------------------------------------------------------------------------- the three benchmarks

def make_train_step(ids: torch.Tensor, is_hf: bool, device: torch.device) -> Callable[[nn.Module], Callable[[], None]]:
    """Both losses are CE + router_aux_loss_coef * load-balancing loss."""
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)

    def make(model: nn.Module) -> Callable[[], None]:
        model.train()
        on_gpu = device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu, foreach=None if on_gpu else False)
        x, y = ids.to(device), targets.to(device)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if is_hf:
                loss = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False).loss
            else:
                loss = model(x, y)
            loss.backward()
            opt.step()
        return step
    return make


def make_prefill(ids: torch.Tensor, is_hf: bool, device: torch.device) -> Callable[[nn.Module], Callable[[], None]]:
    def make(model: nn.Module) -> Callable[[], None]:
        model.eval()
        x = ids.to(device)

        @torch.no_grad()
        def prefill() -> None:
            if is_hf:
                model(input_ids=x, use_cache=False, logits_to_keep=1)
            else:  # the head sees the last position only, as transformers' logits_to_keep=1
                model(x, last_logits_only=True)
        return prefill
    return make


def make_decode(prompts: torch.Tensor, new_tokens: int, is_hf: bool, device: torch.device,
                outputs: dict) -> Callable[[nn.Module], Callable[[], None]]:
    """Greedy generation of exactly new_tokens per prompt; the last output lands in outputs[name]."""
    def make(model: nn.Module) -> Callable[[], None]:
        model.eval()
        x = prompts.to(device)
        as_lists = prompts.tolist()

        def run() -> None:
            if is_hf:
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                outputs["transformers"] = out[:, x.shape[1]:].cpu()
            else:
                outs = generate(model, as_lists, SamplingConfig(max_new_tokens=new_tokens))
                outputs["xinzhou"] = torch.tensor([o.ids for o in outs])
        return run
    return make


def both(xz: XinzhouLM, hf: nn.Module, device: torch.device, reps: tuple[int, int],
         make_for: Callable[[bool], Callable[[nn.Module], Callable[[], object]]]) -> dict:
    return {"xinzhou": timed_case(xz, device, make_for(False), reps),
            "transformers": timed_case(hf, device, make_for(True), reps)}


def add_rates(row: dict, tokens: int, flops_tok: int | None, peak_tflops: float) -> dict:
    for name in ("xinzhou", "transformers"):
        r = row[name]
        if isinstance(r, dict):
            r["tokens_per_s"] = tokens / (r["ms"] / 1e3)
            if flops_tok is not None:
                r["mfu"] = flops_tok * r["tokens_per_s"] / (peak_tflops * 1e12)
    a, b = row["xinzhou"], row["transformers"]
    row["ratio_xz_over_hf"] = a["tokens_per_s"] / b["tokens_per_s"] if isinstance(a, dict) and isinstance(b, dict) else None
    return row


def bench_train(xz: XinzhouLM, hf: nn.Module, plan: Plan, device: torch.device, peak: float) -> list[dict]:
    rows = []
    for B, T in plan.train_shapes:
        ids = torch.randint(0, xz.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(2))
        row = {"B": B, "T": T, **both(xz, hf, device, plan.train_reps, lambda h: make_train_step(ids, h, device))}
        rows.append(add_rates(row, B * T, 3 * flops_per_token(xz.config, T, head=True), peak))
        print(format_row("train", row), flush=True)
    return rows


def bench_prefill(xz: XinzhouLM, hf: nn.Module, plan: Plan, device: torch.device, peak: float) -> list[dict]:
    rows = []
    for T in plan.prefill_lens:
        ids = torch.randint(0, xz.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(3))
        row = {"B": 1, "T": T, **both(xz, hf, device, plan.prefill_reps, lambda h: make_prefill(ids, h, device))}
        rows.append(add_rates(row, T, flops_per_token(xz.config, T, head=False), peak))
        print(format_row("prefill", row), flush=True)
    return rows


def bench_decode(xz: XinzhouLM, hf: nn.Module, plan: Plan, device: torch.device) -> list[dict]:
    rows = []
    for B in plan.decode_batches:
        prompts = torch.randint(0, xz.config.vocab_size, (B, plan.prompt_len), generator=torch.Generator().manual_seed(4))
        outputs: dict = {}
        row = {"B": B, "prompt": plan.prompt_len, "new_tokens": plan.new_tokens,
               **both(xz, hf, device, plan.decode_reps,
                      lambda h: make_decode(prompts, plan.new_tokens, h, device, outputs))}
        add_rates(row, B * plan.new_tokens, None, 0.0)
        if "xinzhou" in outputs and "transformers" in outputs:  # bf16 greedy paths may part after a near tie
            row["greedy_token_agreement"] = (outputs["xinzhou"] == outputs["transformers"]).float().mean().item()
        rows.append(row)
        print(format_row("decode", row), flush=True)
    return rows


# ----------------------------------------------------------------------------- report

def format_cell(r: dict | str, mfu: bool) -> str:
    if not isinstance(r, dict):
        return f"{r:>34}"
    mem = f"{r['peak_gib']:6.2f} GiB" if r["peak_gib"] is not None else "       n/a"
    m = f"{100 * r['mfu']:5.1f}% MFU" if mfu and "mfu" in r else " " * 9
    return f"{r['tokens_per_s']:11,.0f} tok/s {m} {mem}"


def format_row(kind: str, row: dict) -> str:
    shape = (f"B={row['B']:<3} T={row['T']:<7}" if kind != "decode"
             else f"B={row['B']:<3} prompt={row['prompt']} new={row['new_tokens']}")
    mfu = kind != "decode"
    ratio = f"{row['ratio_xz_over_hf']:6.2f}x" if row["ratio_xz_over_hf"] is not None else "      -"
    extra = f"  greedy agree {row['greedy_token_agreement']:.2f}" if "greedy_token_agreement" in row else ""
    return (f"{kind:<8}{shape} xinzhou {format_cell(row['xinzhou'], mfu)} | transformers "
            f"{format_cell(row['transformers'], mfu)} | xz/hf {ratio}{extra}")


def environment(device: torch.device, hf: nn.Module) -> dict:
    import transformers
    import triton

    commit = git_commit()
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__, "git_commit": commit,
            "hf_attn_implementation": hf.config._attn_implementation,
            "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None),
            "dtype": "bf16 model (no autocast), bf16 AdamW states"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--quick", action="store_true", help="fewer shapes: prefill 8K and 32K only (both training shapes stay)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--smoke", action="store_true", help="tiny preset and shapes: checks every code path")
    parser.add_argument("--hf-experts", default=None, help="transformers experts_implementation (default: its own)")
    parser.add_argument("--hf-attn", default=None, help="transformers attn_implementation (default: its own)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("train", "prefill", "decode"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_model.py needs a CUDA GPU; on a CPU only `--device cpu --smoke` runs (tiny shapes, "
                 "to check the code paths, not to time anything)")
    if args.device == "cpu" and not args.smoke:
        sys.exit("--device cpu is only for --smoke: CPU timings of the small preset say nothing")
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    device = torch.device(args.device)
    cfg = preset(plan.preset, **plan.overrides)
    hf_kwargs = {k: v for k, v in (("experts_implementation", args.hf_experts),
                                   ("attn_implementation", args.hf_attn)) if v is not None}

    xz, hf = build_pair(cfg, device, hf_kwargs)
    results: dict = {"env": environment(device, hf), "plan": plan.__dict__, "config": cfg.to_dict(),
                     "active_params": cfg.num_params(active=True), "total_params": cfg.num_params()}
    print(json.dumps(results["env"]))
    results["logits_check"] = check_same_function(xz, hf, plan.check_shape, device)
    results["peak_matmul_tflops"] = peak = peak_matmul_tflops(plan.matmul_n, device)
    print(f"peak bf16 matmul {plan.matmul_n}^3: {peak:.1f} TFLOP/s", flush=True)
    if "train" not in args.skip:
        results["train"] = bench_train(xz, hf, plan, device, peak)
    if "prefill" not in args.skip:
        results["prefill"] = bench_prefill(xz, hf, plan, device, peak)
    if "decode" not in args.skip:
        results["decode"] = bench_decode(xz, hf, plan, device)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
