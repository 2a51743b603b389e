"""How fast does the speedrun's model shape learn to attend by position and by content?

L1 (copy, key lookup), L5 (retrieval) and the right arguments of L4 need in-context copying: an
induction circuit (a head that moves the previous token into each position, then a head that
matches the current token against it and copies what followed). This trains the tiny speedrun
shape (hidden 128, 4 heads of 32, LSLS, 4 experts top-2) from scratch on two kinds of rows of
random token ids and prints the held-out loss of each kind as training goes:

- period-2 rows ("a b a b ...", a new pair every 16 tokens): solvable by attending one token back;
- induction rows (a random sequence of 6-16 tokens, four times): solvable only by matching content.

    python experiments/induction/run.py --opt adamw --init 0.02 0.1 --out experiments/induction/results
    python experiments/induction/run.py --opt muon --init 0.02 0.1 --out experiments/induction/results

Chance is ln(501) = 6.22 nats (501 ids). The floors: 1/8 of a period row is unpredictable
(~0.8 nats on average), a quarter of an induction row (~1.6 nats).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from xinzhou.config import preset
from xinzhou.model import XinzhouLM
from xinzhou.optim import make_optimizer

LO, T = 300, 128  # rows of T + 1 ids from LO on


def period_row(rng: random.Random, hi: int) -> list[int]:
    row: list[int] = []
    while len(row) <= T:
        row += [rng.randint(LO, hi), rng.randint(LO, hi)] * 8
    return row[:T + 1]


def induction_row(rng: random.Random, hi: int) -> list[int]:
    row: list[int] = []
    while len(row) <= T:
        row += [rng.randint(LO, hi) for _ in range(rng.randint(6, 16))] * 4
    return row[:T + 1]


def batch(rng: random.Random, n_period: int, n_induction: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.tensor([period_row(rng, hi) for _ in range(n_period)] + [induction_row(rng, hi) for _ in range(n_induction)])
    return rows[:, :-1], rows[:, 1:]


def tiny_model(layers: str, **overrides: object) -> XinzhouLM:
    """The speedrun's tiny shape (hidden 128, 4 heads of 32, 4 experts of 256) with the given layer
    pattern ("L" lightning, "S" softmax, one letter per layer) and any field overridden."""
    shape = dict(vocab_size=1024, hidden_size=128, head_dim=32, rotary_dim=32, expert_dim=256) | overrides
    return XinzhouLM(preset("tiny", layer_types=tuple({"L": "lightning", "S": "softmax"}[c] for c in layers), **shape))


def parse_overrides(items: list[str], flag: str) -> dict:
    """`FIELD=JSON` strings (a repeated command-line option) -> {field: value}."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{flag} {item!r}: the value must be JSON ({e})") from None
    return out


def train_on_rows(model: XinzhouLM, opt_kind: str, lr: float, steps: int, every: int,
                  draw: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                  evaluate: Callable[[int, float], dict], muon_lr: float = 0.02) -> list[dict]:
    """Train on every token of the rows `draw()` returns (inputs, targets), without weight decay
    (with "muon": Muon at `muon_lr` for the hidden matrices, AdamW at `lr` for the rest); every
    `every` steps and at the end, add `evaluate(step, seconds)` (under no_grad) to the curve."""
    opt = make_optimizer(model, lr, 0.0, (0.9, 0.95), kind=opt_kind, muon_lr=muon_lr)
    curve, t0 = [], time.time()
    for step in range(1, steps + 1):
        x, y = draw()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            seconds = round(time.time() - t0, 1)
            with torch.no_grad():
                curve.append({"step": step, "seconds": seconds} | evaluate(step, seconds))
    return curve


def run(init: float, steps: int, lr: float, layers: str, seed: int, every: int, opt_kind: str,
        period_rows: int = 8, hi: int = 800) -> list[dict]:
    torch.manual_seed(seed)
    model = tiny_model(layers, initializer_range=init)
    rng, held = random.Random(seed), random.Random(10_000 + seed)
    eval_period, eval_induction = batch(held, 16, 0, hi), batch(held, 0, 16, hi)

    def evaluate(step: int, seconds: float) -> dict:
        point = {name: round(F.cross_entropy(model(ex).flatten(0, 1), ey.flatten()).item(), 3)
                 for name, (ex, ey) in (("period", eval_period), ("induction", eval_induction))}
        print(f"{opt_kind} init {init} step {step:4d} ({seconds:5.0f} s): held-out loss period-2 "
              f"{point['period']:.2f}, induction {point['induction']:.2f}", flush=True)
        return point

    return train_on_rows(model, opt_kind, lr, steps, every, lambda: batch(rng, period_rows, 16 - period_rows, hi),
                         evaluate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", type=float, nargs="+", default=[0.02, 0.1], help="initializer_range values")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", default="LSLS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--opt", choices=("adamw", "muon"), default="adamw",
                    help="muon: Muon (lr 0.02) for hidden matrices, AdamW at --lr for the rest")
    ap.add_argument("--period-rows", type=int, choices=range(0, 17), default=8, metavar="0..16",
                    help="period-2 rows of the 16 per step (the rest are induction rows)")
    ap.add_argument("--ids", type=int, default=501, help="distinct token ids the rows are drawn from")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = {str(i): run(i, args.steps, args.lr, args.layers, args.seed, args.every, args.opt, args.period_rows,
                           LO + args.ids - 1) for i in args.init}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"curves-{args.opt}.json").write_text(json.dumps(dict(vars(args), out=str(args.out), curves=results), indent=2))
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        for i, (init, curve) in enumerate(results.items()):
            steps = [p["step"] for p in curve]
            ax.plot(steps, [p["period"] for p in curve], "--", color=f"C{i}", label=f"period-2, init {init}")
            ax.plot(steps, [p["induction"] for p in curve], "-", color=f"C{i}", label=f"induction, init {init}")
        ax.axhline(6.22, color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel="step (16 rows of 128 tokens)", ylabel="held-out loss (nats)",
               title=f"tiny shape {args.layers}, {args.opt}, lr {args.lr}: attention by position and by content")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / f"curves-{args.opt}.png", dpi=100)


if __name__ == "__main__":
    main()
