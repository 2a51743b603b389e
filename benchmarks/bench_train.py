"""Training speed on the CPU: xinzhou's training step against transformers' MiniMaxForCausalLM, same
config, same weights, same batches, one process, timed in alternation (A B A B ...) so that both see
the same machine.

A step is forward + loss + backward + AdamW step, fp32 (what the speedrun trains in on a CPU). Two
kinds of batch, at the speedrun's window size:
- "sft": packed windows of whole documents of 20-300 tokens whose last 30% are targets (an SFT
  loss mask: prompts are read, answers are learned); xinzhou trains them document-masked
  (segment_ids: each document on its own, as `xinzhou.train` does), transformers sees plain causal
  rows (it has no such mode), which is less work for it;
- "pretrain": every token a target, no document masks.
Shapes: the speedrun's tiny model (2.1M parameters) and a ~60M hybrid. Before timing, both models'
fp32 logits must agree (max |diff| printed); tokens/s counts every input token of the batch.

Then the optimizer step alone at each shape (the speedrun trains with Muon): make_optimizer's
"muon" (MuonAdamW: Newton-Schulz for the hidden matrices) against its "adamw" (torch's fused
AdamW), on the same gradients; the ratio is what Muon's orthogonalisation costs.

    python benchmarks/bench_train.py --out bench_train.json
    python benchmarks/bench_train.py --smoke --out /tmp/s.json      # tiny shapes, every path
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from timing import git_commit, transformers_twin  # benchmarks/timing.py (scripts run from their folder)
from torch import nn

from xinzhou.config import preset
from xinzhou.model import XinzhouLM
from xinzhou.optim import make_optimizer
from xinzhou.train import keep_freed_memory

SHAPES = {
    # the speedrun's model (cli.RECIPES["tiny"]) at its SFT batch
    "speedrun-2M": (dict(vocab_size=1024, hidden_size=128, head_dim=32, rotary_dim=32, expert_dim=256,
                         layer_types=("lightning", "softmax", "lightning", "softmax")), 8, 512),
    "hybrid-60M": (dict(vocab_size=8192, hidden_size=384, num_heads=8, num_kv_heads=4, head_dim=48, rotary_dim=48,
                        num_experts=8, expert_dim=640, block_size=64, layer_types=("lightning",) * 3 + ("softmax",)
                        + ("lightning",) * 3 + ("softmax",)), 4, 512),
}
SMOKE = {"smoke": (dict(vocab_size=256, hidden_size=64, head_dim=16, rotary_dim=16), 2, 64)}


def batch(kind: str, B: int, T: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (B, T), generator=g)
    if kind == "pretrain":
        return x, torch.randint(1, vocab, (B, T), generator=g), None
    y = torch.full((B, T), -100)
    seg = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        t, d = 0, 0
        while t < T:
            n = min(int(torch.randint(20, 301, (1,), generator=g)), T - t)
            y[b, t + n - max(1, int(0.3 * n)):t + n] = torch.randint(1, vocab, (max(1, int(0.3 * n)),), generator=g)
            seg[b, t:t + n] = d
            t, d = t + n, d + 1
    return x, y, seg


def step_fns(xz: XinzhouLM, hf: nn.Module, x: torch.Tensor, y: torch.Tensor, seg: torch.Tensor | None):
    opts = {name: make_optimizer(m, 1e-4, 0.1, (0.9, 0.95)) for name, m in (("xinzhou", xz), ("transformers", hf))}

    def ours() -> None:
        xz(x, y, segment_ids=seg).backward()
        opts["xinzhou"].step()
        opts["xinzhou"].zero_grad(set_to_none=True)

    def theirs() -> None:
        # labels are shifted inside transformers: give it the unshifted sequence's targets
        labels = torch.cat([torch.full((y.shape[0], 1), -100), y[:, :-1]], dim=1)
        hf(input_ids=x, labels=labels, use_cache=False).loss.backward()
        opts["transformers"].step()
        opts["transformers"].zero_grad(set_to_none=True)

    return ours, theirs


def alternate(fns: dict, warmup: int, reps: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn reps times after warmup rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def optimizer_row(name: str, cfg, reps: int) -> dict:
    """Median ms of one MuonAdamW step and one fused AdamW step on cfg's parameters, alternated."""
    models = {kind: XinzhouLM(cfg) for kind in ("muon", "adamw")}
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in models["muon"].parameters()]
    opts = {kind: make_optimizer(m, 1e-3, 0.1, (0.9, 0.95), kind=kind, muon_lr=0.02) for kind, m in models.items()}

    def stepper(kind: str):
        def step() -> None:
            for p, g in zip(models[kind].parameters(), grads):
                p.grad = g
            opts[kind].step()
        return step

    s = alternate({kind: stepper(kind) for kind in opts}, warmup=2, reps=reps)
    row = dict(shape=name, params_M=cfg.num_params() / 1e6, muon_ms=1e3 * s["muon"], adamw_ms=1e3 * s["adamw"])
    print(f"{name:12} optimizer step: muon {row['muon_ms']:7.1f} ms | adamw (fused) {row['adamw_ms']:6.1f} ms | "
          f"muon/adamw {row['muon_ms'] / row['adamw_ms']:5.1f}x", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks every code path")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    shapes = SMOKE if args.smoke else SHAPES
    keep_freed_memory(torch.device("cpu"))  # as xinzhou.train does; process-wide, so both models get it
    reps = args.reps or (1 if args.smoke else 7)
    rows = []
    for name, (overrides, B, T) in shapes.items():
        cfg = preset("tiny", **overrides)
        xz, hf = transformers_twin(cfg)
        xz.train(), hf.train()
        for kind in ("sft", "pretrain"):
            x, y, seg = batch(kind, B, T, cfg.vocab_size, seed=0)
            ours, theirs = step_fns(xz, hf, x, y, seg)
            s = alternate({"xinzhou": ours, "transformers": theirs}, warmup=1 if args.smoke else 2, reps=reps)
            row = dict(shape=name, params_M=cfg.num_params() / 1e6, batch=kind, B=B, T=T,
                       target_fraction=float((y != -100).float().mean()),
                       **{f"{k}_tok_s": B * T / v for k, v in s.items()}, seconds=s)
            row["ratio_xz_over_hf"] = row["xinzhou_tok_s"] / row["transformers_tok_s"]
            rows.append(row)
            print(f"{name:12} {kind:8} B={B} T={T} targets {row['target_fraction']:4.0%}: xinzhou "
                  f"{row['xinzhou_tok_s']:8,.0f} tok/s | transformers {row['transformers_tok_s']:8,.0f} tok/s | "
                  f"xz/hf {row['ratio_xz_over_hf']:4.2f}x", flush=True)
    optim_rows = [optimizer_row(name, preset("tiny", **overrides), reps=3 if args.smoke else 3 * reps)
                  for name, (overrides, _, _) in shapes.items()]
    info = dict(commit=git_commit(), torch=torch.__version__, threads=torch.get_num_threads(), rows=rows,
                optimizer_rows=optim_rows)
    Path(args.out).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
