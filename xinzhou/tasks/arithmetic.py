"""L2 multi-digit arithmetic: both operands have exactly `digits` digits; the answer is the number.

    47+38=   -> thinking "7+8=15\n4+3+1=8" (column sums, ones first; with scratchpad), content "85"

The level's eval set is held-out two-digit addition: `generate("test", n, seed, digits=2)`.
Subtraction keeps a >= b, so every answer is a non-negative integer.
"""

from __future__ import annotations

import random

from xinzhou.tasks.common import ParsedLike, Sample, assistant, draw

FAMILY = "arithmetic"
LEVEL = 2
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def generate(
    split: str, n: int, seed: int, *, digits: int = 2, ops: tuple[str, ...] = ("+",), scratchpad: bool = True
) -> list[Sample]:
    """`n` problems `a op b` with `digits`-digit operands; addition gets a column scratchpad."""
    if digits < 1:
        raise ValueError(f"arithmetic: digits must be >= 1, got {digits}")
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"arithmetic: ops must be a non-empty subset of {tuple(OPS)}, got {ops!r}")
    lo, hi = 10 ** (digits - 1), 10**digits - 1

    def propose(rng: random.Random) -> tuple[str, tuple[int, str, int]]:
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
        if op == "-" and a < b:
            a, b = b, a
        return f"{a}{op}{b}", (a, op, b)

    def build(p: tuple[int, str, int], rng: random.Random) -> Sample:
        a, op, b = p
        answer = str(OPS[op](a, b))
        reasoning = column_sums(a, b) if scratchpad and op == "+" else ""
        return Sample(
            messages=[{"role": "user", "content": f"{a}{op}{b}="}],
            target=[assistant(answer, reasoning)],
            answer=answer,
            level=LEVEL,
            family=FAMILY,
            meta={"a": a, "op": op, "b": b, "digits": digits},
        )

    return draw(FAMILY, split, n, seed, propose, build)


def column_sums(a: int, b: int) -> str:
    """Schoolbook addition, ones column first: one line "x+y[+1]=s" per column."""
    lines, carry = [], 0
    while a or b:  # the last column's sum shows the final carry, so no extra line for it
        x, y = a % 10, b % 10
        s = x + y + carry
        lines.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        a, b, carry = a // 10, b // 10, s // 10
    return "\n".join(lines)


def verify(sample: Sample, parsed: ParsedLike) -> bool:
    return parsed.content.strip() == sample.answer
