"""Can the speedrun's model shape learn key lookup (associative recall) at all, and what does it cost?

L1's key lookups (`c=ocean f=mango a=lemon\\nf?` -> `mango`) stay near the 22% of picking a random
listed value in the tiny speedrun, while copying a sequence is solved. This trains a model from
scratch on rows of random token ids that are nothing but key lookups and prints how often it
names the right value:

    k1 = v1 k2 = v2 ... k12 = v12 | k7 = v7 k2 = v2 ...   (--sep: each pair with a separator id)
    k1 v1 k2 v2 ... k12 v12 | k7 v7 k2 v2 ...             (--no-sep)

After the list every key is asked once, in a random order, so a query's value can only come from
the list, never from an earlier query. Training predicts every token; the score is the argmax
accuracy on the queries' values (chance: 1 / pairs, for a model that picks a listed value; a
model that picks a listed value not asked yet in the row scores (1/6 + 1/5 + ... + 1/1) / 6 =
40.8% at 6 pairs without matching a key, so the accuracy of each query by its order is printed
too: the first query's is lookup alone).
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
    """One row and the positions (in the row) of its queries' values, in the order asked."""
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
    order = torch.full_like(ids, -1)  # at each query's value: 0 for the first query of the row, 1, ...; else -1
    for b, (_, answers) in enumerate(lookups):
        order[b, answers] = torch.arange(len(answers))
    return ids[:, :-1], ids[:, 1:], order[:, 1:]


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
        overrides: dict | None = None, rows: int = 16, muon_lr: float = 0.02, no_sep_first: int = 0,
        no_sep_every: int = 0) -> list[dict]:
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
    ex, ey, eorder = batch(held, 64, pairs, sep)
    emask = eorder >= 0
    ix, iy, _ = batch(held, 16, pairs, sep, induction=16)  # held-out copying rows (value ids), for comparison
    half = ix.shape[1] // 2  # the second half of a copying row is all copies
    copy_ids = [*KEYS, *VALUES] if copy_keys else VALUES

    drawn = 0

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal drawn  # without the separator: the first no_sep_first steps, and every no_sep_every-th step
        drawn += 1
        plain = drawn <= no_sep_first or (no_sep_every and drawn % no_sep_every == 0)
        return batch(rng, rows, pairs, sep and not plain, induction, copy_ids)[:2]

    def evaluate(step: int, seconds: float) -> dict:
        logits = model(ex)[emask]
        right = logits.argmax(-1) == ey[emask]
        point = {"copy_loss": round(F.cross_entropy(model(ix)[:, half:].flatten(0, 1), iy[:, half:].flatten()).item(), 3),
                 "loss": round(F.cross_entropy(logits, ey[emask]).item(), 3),
                 "accuracy": round(right.float().mean().item(), 4),
                 "accuracy_by_order": [round(right[eorder[emask] == i].float().mean().item(), 3) for i in range(pairs)]}
        print(f"{'llama ' if arch == 'llama' else ''}{layers} {'sep' if sep else 'no-sep'} step {step:4d} ({seconds:5.0f} s): "
              f"query values: loss {point['loss']:.2f}, accuracy {100 * point['accuracy']:.1f}% "
              f"(1st, 2nd, ... query: {' '.join(f'{100 * a:.0f}' for a in point['accuracy_by_order'])}); "
              f"second half of copying rows: loss {point['copy_loss']:.2f}", flush=True)
        return point

    return train_on_rows(model, opt_kind, lr, steps, every, draw, evaluate, muon_lr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="LSLS", help="L = lightning, S = softmax, one letter per layer")
    ap.add_argument("--sep", action=argparse.BooleanOptionalAction, default=True,
                    help="a separator id between each key and its value (as '=' in L1)")
    ap.add_argument("--no-sep-first", type=int, default=0, metavar="STEPS",
                    help="train the first STEPS steps on rows without the separator (a curriculum; scored as --sep says)")
    ap.add_argument("--no-sep-every", type=int, default=0, metavar="K",
                    help="train every K-th step on rows without the separator (a mix; scored as --sep says)")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rows", type=int, default=16, help="rows per training step")
    ap.add_argument("--induction-rows", type=int, default=0, metavar="N",
                    help="rows of each step that repeat a random sequence (copying) instead of key lookups")
    ap.add_argument("--copy-keys", action="store_true",
                    help="copying rows draw from the key ids too (by default only from the value ids)")
    ap.add_argument("--arch", choices=("xinzhou", "llama"), default="xinzhou",
                    help="llama: transformers' Llama with as many layers as --layers has letters (a control)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=JSON",
                    help="override a field of the xinzhou model's config, e.g. residual='\"prenorm\"' or num_experts=1")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW rate")
    ap.add_argument("--muon-lr", type=float, default=0.02, help="Muon's rate for the hidden matrices (--opt muon)")
    ap.add_argument("--opt", choices=("adamw", "muon"), default="muon")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    overrides = parse_overrides(args.overrides, "--set")
    if not 0 <= args.induction_rows < args.rows:
        raise SystemExit(f"--induction-rows {args.induction_rows}: expected 0 to {args.rows - 1} (--rows {args.rows})")
    curve = run(args.layers, args.sep, args.pairs, args.steps, args.lr, args.opt, args.seed, args.every,
                args.hidden, args.heads, args.induction_rows, args.copy_keys, args.arch, overrides,
                args.rows, args.muon_lr, args.no_sep_first, args.no_sep_every)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = (f"kv-{'llama-' if args.arch == 'llama' else ''}{args.layers}-{'sep' if args.sep else 'nosep'}-h{args.hidden}-ind{args.induction_rows}"
                f"{'-copykeys' if args.copy_keys else ''}-seed{args.seed}")
        (args.out / f"{name}.json").write_text(json.dumps(dict(vars(args), out=str(args.out), curve=curve), indent=2))


if __name__ == "__main__":
    main()
