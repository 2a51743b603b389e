"""Can the speedrun's model shape learn key lookup (associative recall) at all, and what does it cost?

L1's key lookups (`c=ocean f=mango a=lemon\\nf?` -> `mango`) stay near the 22% of picking a random
listed value in the tiny speedrun, while copying a sequence is solved. This trains a model from
scratch on rows of random token ids that are nothing but key lookups and prints how often it
names the right value:

    k1 = v1 k2 = v2 ... k12 = v12 | k7 = v7 k2 = v2 ...   (--sep: each pair with a separator id)
    k1 v1 k2 v2 ... k12 v12 | k7 v7 k2 v2 ...             (--no-sep)

After the list every key is asked once, in a random order, so a query's value can only come from
the list, never from an earlier query. Training predicts every token; the score is the argmax
accuracy on the queries' values (chance: 1 / pairs, for a model that picks a listed value).
Without a separator, a query's value follows its key as in the list (an induction step: match
the current token, copy what came after it). With one, the token before the value is the same
separator in every pair, so the model must match the token two back: what `=` does in L1.

    python experiments/induction/kv.py --layers LSLS --sep --out experiments/induction/results
    python experiments/induction/kv.py --layers LSLS --no-sep --out experiments/induction/results
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from run import parse_overrides, tiny_model, train_on_rows  # experiments/induction/run.py: the same shape and loop

KEYS, VALUES, SEP, BAR = range(300, 340), range(400, 500), 299, 298


def kv_row(rng: random.Random, pairs: int, sep: bool) -> tuple[list[int], list[int]]:
    """One row and the positions (in the row) of its queries' values."""
    keys, values = rng.sample(KEYS, pairs), rng.choices(VALUES, k=pairs)

    def pair(k: int, v: int) -> list[int]:
        return [k, SEP, v] if sep else [k, v]

    row = [t for k, v in zip(keys, values) for t in pair(k, v)] + [BAR]
    answers = []
    for i in rng.sample(range(pairs), pairs):
        row += pair(keys[i], values[i])
        answers.append(len(row) - 1)
    return row, answers


def induction_row(rng: random.Random, length: int, ids: range | list[int] = VALUES) -> list[int]:
    """A random sequence of 6-16 `ids` written over and over (copying by content; no queries)."""
    row: list[int] = []
    while len(row) < length:
        row += rng.choices(ids, k=rng.randint(6, 16)) * 4
    return row[:length]


def batch(rng: random.Random, n: int, pairs: int, sep: bool, induction: int = 0,
          copy_ids: range | list[int] = VALUES) -> tuple[torch.Tensor, ...]:
    length = 2 * pairs * (3 if sep else 2) + 1
    lookups = [kv_row(rng, pairs, sep) for _ in range(n - induction)]
    ids = torch.tensor([row for row, _ in lookups] + [induction_row(rng, length, copy_ids) for _ in range(induction)])
    is_answer = torch.zeros_like(ids, dtype=torch.bool)
    for b, (_, pos) in enumerate(lookups):
        is_answer[b, pos] = True
    return ids[:, :-1], ids[:, 1:], is_answer[:, 1:]


class LlamaControl(torch.nn.Module):
    """transformers' Llama (pre-norm, RoPE, dense SwiGLU, plain residual) at the same width and number
    of heads: a standard transformer trained on the same rows, as an outside reference."""

    def __init__(self, layers: int, hidden: int, heads: int) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM
        self.lm = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=4 * hidden,
                                               num_hidden_layers=layers, num_attention_heads=heads,
                                               num_key_value_heads=heads, max_position_embeddings=512))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


def run(layers: str, sep: bool, pairs: int, steps: int, lr: float, opt_kind: str, seed: int, every: int,
        hidden: int, heads: int, induction: int, copy_keys: bool = False, arch: str = "xinzhou",
        overrides: dict | None = None) -> list[dict]:
    torch.manual_seed(seed)
    if arch == "llama":
        if opt_kind != "adamw":
            raise SystemExit("--arch llama trains with --opt adamw only (Muon's parameter split is xinzhou's)")
        if overrides:
            raise SystemExit("--set changes xinzhou's config; --arch llama has none")
        model = LlamaControl(len(layers), hidden, heads)
    else:
        shape = dict(hidden_size=hidden, num_heads=heads, num_kv_heads=max(1, heads // 2), head_dim=hidden // heads,
                     rotary_dim=hidden // heads, expert_dim=2 * hidden)
        model = tiny_model(layers, **shape | (overrides or {}))
    rng, held = random.Random(seed), random.Random(10_000 + seed)
    ex, ey, emask = batch(held, 64, pairs, sep)
    ix, iy, _ = batch(held, 16, pairs, sep, induction=16)  # held-out copying rows (value ids), for comparison
    half = ix.shape[1] // 2  # the second half of a copying row is all copies
    copy_ids = [*KEYS, *VALUES] if copy_keys else VALUES

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return batch(rng, 16, pairs, sep, induction, copy_ids)[:2]

    def evaluate(step: int, seconds: float) -> dict:
        logits = model(ex)[emask]
        point = {"copy_loss": round(F.cross_entropy(model(ix)[:, half:].flatten(0, 1), iy[:, half:].flatten()).item(), 3),
                 "loss": round(F.cross_entropy(logits, ey[emask]).item(), 3),
                 "accuracy": round((logits.argmax(-1) == ey[emask]).float().mean().item(), 4)}
        print(f"{'llama ' if arch == 'llama' else ''}{layers} {'sep' if sep else 'no-sep'} step {step:4d} ({seconds:5.0f} s): "
              f"query values: loss {point['loss']:.2f}, accuracy {100 * point['accuracy']:.1f}%; "
              f"second half of copying rows: loss {point['copy_loss']:.2f}", flush=True)
        return point

    return train_on_rows(model, opt_kind, lr, steps, every, draw, evaluate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="LSLS", help="L = lightning, S = softmax, one letter per layer")
    ap.add_argument("--sep", action=argparse.BooleanOptionalAction, default=True,
                    help="a separator id between each key and its value (as '=' in L1)")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--induction-rows", type=int, choices=range(0, 16), default=0, metavar="0..15",
                    help="rows of the 16 per step that repeat a random sequence (copying) instead of key lookups")
    ap.add_argument("--copy-keys", action="store_true",
                    help="copying rows draw from the key ids too (by default only from the value ids)")
    ap.add_argument("--arch", choices=("xinzhou", "llama"), default="xinzhou",
                    help="llama: transformers' Llama with as many layers as --layers has letters (a control)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=JSON",
                    help="override a field of the xinzhou model's config, e.g. residual='\"prenorm\"' or num_experts=1")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW rate (Muon, for hidden matrices, at 0.02)")
    ap.add_argument("--opt", choices=("adamw", "muon"), default="muon")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    overrides = parse_overrides(args.overrides, "--set")
    curve = run(args.layers, args.sep, args.pairs, args.steps, args.lr, args.opt, args.seed, args.every,
                args.hidden, args.heads, args.induction_rows, args.copy_keys, args.arch, overrides)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = (f"kv-{'llama-' if args.arch == 'llama' else ''}{args.layers}-{'sep' if args.sep else 'nosep'}-h{args.hidden}-ind{args.induction_rows}"
                f"{'-copykeys' if args.copy_keys else ''}-seed{args.seed}")
        (args.out / f"{name}.json").write_text(json.dumps(dict(vars(args), out=str(args.out), curve=curve), indent=2))


if __name__ == "__main__":
    main()
