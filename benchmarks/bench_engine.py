"""Engine speed: xinzhou's continuous-batching engine vs transformers `generate`, same checkpoint, one process.

The model is built as an XinzhouLM, written with `save_hf` and read back by transformers'
`MiniMaxForCausalLM`; their fp32 logits must agree before anything is timed. Then:

1. decode: greedy, `prompt` random tokens, exactly `new` new tokens, 1 / 16 / 64 concurrent requests:
   `xinzhou.engine.generate` (every request admitted at once: one packed prefill, then one packed
   decode step per token) vs transformers `generate` (a [B, prompt] batch, no padding needed).
   tokens/s = B * new / time of the whole call (prefill included); the greedy tokens of the two are
   compared (fp32 CPU runs agree exactly unless a near tie parts them). On CUDA (and in --smoke, where
   the same fixed-shape steps run without capture) a third column: one `Engine(cuda_graphs=True)`
   kept across the calls, so its graphs are captured in the warmup call and replayed in the timed
   ones (engine/graphs.py); its greedy tokens are compared with the plain engine's.
2. time to first token of a returning conversation: turn 1 is a `ttft_prompt`-token prompt and a
   32-token reply; turn 2 is turn 1 + its reply + 16 new tokens. TTFT of turn 2 (add_request to
   its first Token event) with prefix reuse (the turn-end snapshot restored; 17 tokens prefilled)
   vs without (the whole prompt prefilled).
3. long context: cache bytes per sequence at 4K and 32K tokens, hybrid vs all-softmax of the same
   shape (the hybrid's lightning state is constant, its one softmax layer in eight grows), and
   the hybrid prefilling a `long`-token prompt through the engine in chunks of `chunk` tokens.

Ratios are same-run: xinzhou / transformers, and without / with reuse. Medians of `reps` timed calls
after a warmup call (CUDA events on the GPU, perf_counter on the CPU; benchmarks/timing.py).

    python benchmarks/bench_engine.py --out bench_engine.json                 # CUDA if present, else CPU
    python benchmarks/bench_engine.py --device cpu --out /tmp/bench_engine.json
    python benchmarks/bench_engine.py --smoke --out /tmp/smoke.json           # tiny shapes: every path
    python benchmarks/bench_engine.py --skip decode ttft --long 1048575 --out long.json   # 1M tokens (GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from timing import git_commit, time_ms, transformers_twin  # benchmarks/timing.py (scripts run from their folder)
from torch import nn

from xinzhou.cache import cache_sizes
from xinzhou.config import ModelConfig, preset
from xinzhou.engine import Engine, SamplingParams, Token, generate
from xinzhou.model import XinzhouLM

MIB = 2**20
CPU_SHAPE = dict(vocab_size=8192, hidden_size=256, num_heads=8, num_kv_heads=4, head_dim=32, rotary_dim=32,
                 layer_types=("lightning",) * 7 + ("softmax",), num_experts=8, expert_dim=512, block_size=256)


@dataclass(frozen=True, kw_only=True)
class Plan:
    preset: str
    overrides: dict = field(default_factory=dict)
    dtype: str = "float32"
    batches: tuple[int, ...] = (1, 16, 64)
    prompt: int = 128
    new: int = 32
    ttft_prompt: int = 2000
    long: int = 32768
    chunk: int = 2048
    reps: tuple[int, int] = (1, 3)  # (warmup, timed)


PLANS = {
    # transformers' MiniMax rotates the whole head: rotary_dim = head_dim in every plan
    "cuda": Plan(preset="small", dtype="bfloat16", prompt=512, new=64, long=131072, chunk=8192, reps=(1, 5)),
    "cpu": Plan(preset="tiny", overrides=CPU_SHAPE),
    "smoke": Plan(preset="tiny", overrides=dict(rotary_dim=16), batches=(1, 4), prompt=16, new=4, ttft_prompt=100,
                  long=2048, chunk=512, reps=(0, 1)),
}


def build_pair(cfg: ModelConfig, dtype: torch.dtype) -> tuple[XinzhouLM, nn.Module]:
    """xinzhou model with random weights, and transformers' model loaded from its save_hf checkpoint."""
    xz, hf = transformers_twin(cfg)
    return xz.eval().to(dtype), hf.eval().to(dtype)


def engine_generate(engine: Engine, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Greedy, exactly `new` tokens for every prompt, through an engine that outlives the call."""
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=new)) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for e in engine.step():
            if isinstance(e, Token):
                out[e.request_id].append(e.token_id)
    return [out[i] for i in ids]


def bench_decode(xz: XinzhouLM, hf: nn.Module, plan: Plan, device: torch.device, graphs: bool) -> list[dict]:
    rows = []
    for B in plan.batches:
        prompts = torch.randint(0, xz.config.vocab_size, (B, plan.prompt), generator=torch.Generator().manual_seed(B))
        x = prompts.to(device)
        got: dict = {}

        def ours() -> None:
            got["xinzhou"] = [o.ids for o in generate(xz, prompts.tolist(), SamplingParams(max_new_tokens=plan.new))]

        def theirs() -> None:
            out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=plan.new,
                              min_new_tokens=plan.new, do_sample=False, pad_token_id=0)
            got["transformers"] = out[:, plan.prompt:].tolist()

        ms = {"xinzhou": time_ms(ours, *plan.reps, device), "transformers": time_ms(theirs, *plan.reps, device)}
        if graphs:
            engine = Engine(xz, max_batch=B, max_tokens_per_step=B * plan.prompt, prefix_reuse=False, cuda_graphs=True)

            def with_graphs() -> None:
                got["graphs"] = engine_generate(engine, prompts.tolist(), plan.new)

            ms["graphs"] = time_ms(with_graphs, max(plan.reps[0], 1), plan.reps[1], device)
        same = sum(a == b for ra, rb in zip(got["xinzhou"], got["transformers"]) for a, b in zip(ra, rb))
        row = {"B": B, "prompt": plan.prompt, "new": plan.new,
               **{f"{k}_tok_s": B * plan.new / (v / 1e3) for k, v in ms.items()}, "ms": ms,
               "greedy_agreement": same / (B * plan.new)}
        row["ratio_xz_over_hf"] = row["xinzhou_tok_s"] / row["transformers_tok_s"]
        line = (f"decode  B={B:<3} prompt={plan.prompt} new={plan.new}: xinzhou {row['xinzhou_tok_s']:9,.0f} tok/s | "
                f"transformers {row['transformers_tok_s']:9,.0f} tok/s | xz/hf {row['ratio_xz_over_hf']:5.2f}x | "
                f"greedy agree {row['greedy_agreement']:.2f}")
        if graphs:
            row["graphs_greedy_agreement"] = sum(a == b for ra, rb in zip(got["graphs"], got["xinzhou"])
                                                 for a, b in zip(ra, rb)) / (B * plan.new)
            row["ratio_graphs_over_hf"] = row["graphs_tok_s"] / row["transformers_tok_s"]
            line += (f" | graphs {row['graphs_tok_s']:9,.0f} tok/s, /hf {row['ratio_graphs_over_hf']:5.2f}x, "
                     f"agree with eager {row['graphs_greedy_agreement']:.2f}")
        rows.append(row)
        print(line, flush=True)
    return rows


def first_token_ms(engine: Engine, prompt: list[int], device: torch.device) -> tuple[float, int]:
    """(ms from add_request to the first Token, prompt tokens the engine computed); the request then runs out."""
    before = engine.prefill_tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_new_tokens=1))
    while not any(isinstance(e, Token) for e in engine.step()):
        pass
    ms = 1e3 * (time.perf_counter() - t0)  # the token is on the host: the step synchronised
    while engine.has_work():
        engine.step()
    return ms, engine.prefill_tokens - before


def bench_ttft(xz: XinzhouLM, plan: Plan, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(7)
    turn1 = torch.randint(0, xz.config.vocab_size, (plan.ttft_prompt,), generator=g).tolist()
    user = torch.randint(0, xz.config.vocab_size, (16,), generator=g).tolist()
    out = {"turn1_prompt": plan.ttft_prompt}
    for reuse in (True, False):
        engine = Engine(xz, max_batch=2, max_tokens_per_step=plan.chunk, prefix_reuse=reuse)
        rid = engine.add_request(turn1, SamplingParams(max_new_tokens=32))
        reply = []
        while engine.has_work():
            reply += [e.token_id for e in engine.step() if isinstance(e, Token) and e.request_id == rid]
        turn2 = turn1 + reply + user
        times, computed = [], 0
        for i in range(plan.reps[0] + plan.reps[1]):
            ms, computed = first_token_ms(engine, turn2, device)
            if i >= plan.reps[0]:
                times.append(ms)
        key = "with_reuse" if reuse else "without_reuse"
        out[key] = {"ms": sorted(times)[len(times) // 2], "prefilled_tokens": computed, "turn2_prompt": len(turn2)}
    out["ratio_without_over_with"] = out["without_reuse"]["ms"] / out["with_reuse"]["ms"]
    print(f"ttft    turn 2 of {out['with_reuse']['turn2_prompt']} tokens: with reuse {out['with_reuse']['ms']:8.1f} ms "
          f"({out['with_reuse']['prefilled_tokens']} prefilled) | without {out['without_reuse']['ms']:8.1f} ms "
          f"({out['without_reuse']['prefilled_tokens']} prefilled) | {out['ratio_without_over_with']:5.1f}x", flush=True)
    return out


def bench_long(xz: XinzhouLM, plan: Plan, device: torch.device) -> dict:
    cfg = xz.config
    dtype = next(xz.parameters()).dtype
    softmax_twin = cfg.replace(layer_types=("softmax",) * cfg.num_layers)
    out: dict = {"bytes_per_sequence": {}}
    for name, c in (("hybrid", cfg), ("all_softmax", softmax_twin)):
        page, state = cache_sizes(c, 16, dtype)
        out["bytes_per_sequence"][name] = {T: state + -(-T // 16) * page for T in (4096, 32768)}
    for T in (4096, 32768):
        h, s = out["bytes_per_sequence"]["hybrid"][T], out["bytes_per_sequence"]["all_softmax"][T]
        print(f"memory  {T // 1024}K tokens: hybrid {h / MIB:8.2f} MiB | all-softmax {s / MIB:8.2f} MiB | "
              f"{s / h:4.1f}x", flush=True)
    page, state = cache_sizes(cfg, 16, dtype)
    engine = Engine(xz, max_batch=1, max_tokens_per_step=plan.chunk, prefix_reuse=False,
                    cache_bytes=state + -(-(plan.long + 1) // 16) * page)
    prompt = torch.randint(0, cfg.vocab_size, (plan.long,), generator=torch.Generator().manual_seed(9)).tolist()
    state_shapes = {i: tuple(t.shape) for i, t in engine.cache.state.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_new_tokens=1))
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert {i: tuple(t.shape) for i, t in engine.cache.state.items()} == state_shapes
    seconds = time.perf_counter() - t0
    out["prefill"] = {"tokens": plan.long, "chunk": plan.chunk, "steps": steps, "seconds": seconds,
                      "tokens_per_s": plan.long / seconds, "cache_bytes": engine.cache.memory_bytes()}
    peak = ""
    if device.type == "cuda":  # weights, cache and the largest chunk's activations
        out["prefill"]["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    print(f"prefill {plan.long} tokens in {steps} chunks of {plan.chunk}: {seconds:.1f} s "
          f"({plan.long / seconds:,.0f} tok/s), cache {engine.cache.memory_bytes() / MIB:.1f} MiB, "
          f"lightning state {state / MIB:.3f} MiB whatever the length{peak}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda if present")
    parser.add_argument("--smoke", action="store_true", help="tiny preset and shapes: checks every code path")
    parser.add_argument("--skip", nargs="*", default=[], choices=("decode", "ttft", "long"))
    parser.add_argument("--long", type=int, default=None,
                        help="prompt tokens of the long prefill (default: the plan's; the small preset takes up to "
                             "1048575, its 2^20 positions less the one new token)")
    parser.add_argument("--chunk", type=int, default=None, help="tokens per prefill step (default: the plan's)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    plan = PLANS["smoke" if args.smoke else device.type]
    plan = replace(plan, long=args.long or plan.long, chunk=args.chunk or plan.chunk)
    cfg = preset(plan.preset, **plan.overrides)
    if cfg.rotary_dim != cfg.head_dim:
        cfg = cfg.replace(rotary_dim=cfg.head_dim)
    xz, hf = build_pair(cfg, getattr(torch, plan.dtype))
    xz.to(device)
    import transformers

    results: dict = {"env": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                             "threads": torch.get_num_threads(), "torch": torch.__version__,
                             "transformers": transformers.__version__, "git_commit": git_commit()},
                     "plan": asdict(plan), "config": cfg.to_dict(), "total_params": cfg.num_params()}
    print(json.dumps(results["env"]), f"{cfg.num_params() / 1e6:.1f}M params, {plan.dtype}", flush=True)
    if "decode" not in args.skip:
        hf.to(device)
        results["decode"] = bench_decode(xz, hf, plan, device, graphs=device.type == "cuda" or args.smoke)
        hf.to("cpu")
    if "ttft" not in args.skip:
        results["ttft"] = bench_ttft(xz, plan, device)
    if "long" not in args.skip:
        results["long"] = bench_long(xz, plan, device)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
