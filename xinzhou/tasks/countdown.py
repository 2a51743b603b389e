"""L3 countdown: combine the given numbers, each exactly once, with + - * to reach the target.

    Make 32 from 3 5 4   -> thinking "(5-3)*4=8 no\n(3+5)*4=32 yes", content "(3+5)*4"

The thinking is a search: zero to two wrong attempts (each checked and rejected), then the
solution. Gold expressions are left-nested, "(a o b) o c", but `verify` accepts any expression
that `evaluate` parses, e.g. "4*(5+3)" or "(3+5)*4=32". Expressions are parsed by a small
recursive-descent parser, never `eval`.
"""

from __future__ import annotations

import random
import re

from xinzhou.tasks.common import ParsedLike, Sample, assistant, draw

FAMILY = "countdown"
LEVEL = 3
MAX_CHARS = 200  # bounds the parser's recursion depth and the size of any value
MAX_DIGITS = 6
_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*()]))")


def tokenize(expr: str) -> list[str]:
    tokens, i = [], 0
    expr = expr.rstrip()
    while i < len(expr):
        m = _TOKEN.match(expr, i)
        if m is None:
            raise ValueError(f"unexpected character {expr[i:].lstrip()[:1]!r} at position {i}")
        tok = m.group(1) or m.group(2)
        if tok.isdigit() and len(tok) > MAX_DIGITS:
            raise ValueError(f"number {tok[:10]}... has more than {MAX_DIGITS} digits")
        tokens.append(tok)
        i = m.end()
    return tokens


def evaluate(expr: str) -> tuple[int, list[int]]:
    """The value of an integer expression over + - * and parentheses, and the numbers it uses.

    Grammar: expr = term (("+" | "-") term)*; term = atom ("*" atom)*; atom = NUMBER | "(" expr ")".
    Raises ValueError on anything else (unary minus, division, names, empty input).
    """
    if not isinstance(expr, str):
        raise ValueError(f"expression must be a str, got {type(expr).__name__}")
    if len(expr) > MAX_CHARS:
        raise ValueError(f"expression longer than {MAX_CHARS} characters")
    tokens, pos, used = tokenize(expr), 0, []

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("expression ends early")
        pos += 1
        return tokens[pos - 1]

    def parse_expr() -> int:
        value = parse_term()
        while peek() in ("+", "-"):
            value = value + parse_term() if take() == "+" else value - parse_term()
        return value

    def parse_term() -> int:
        value = parse_atom()
        while peek() == "*":
            take()
            value *= parse_atom()
        return value

    def parse_atom() -> int:
        tok = take()
        if tok == "(":
            value = parse_expr()
            if take() != ")":
                raise ValueError("expected ')'")
            return value
        if not tok.isdigit():
            raise ValueError(f"expected a number or '(', got {tok!r}")
        used.append(int(tok))
        return int(tok)

    value = parse_expr()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} after a complete expression")
    return value, used


def generate(
    split: str, n: int, seed: int, *, count: int = 3, max_number: int = 15, max_target: int = 99
) -> list[Sample]:
    """`n` problems of `count` numbers in 1..max_number with a reachable target in 1..max_target."""
    if count < 2 or max_number < 1 or max_target < 1:
        raise ValueError(f"countdown: need count >= 2, max_number >= 1, max_target >= 1; got {count}, {max_number}, {max_target}")

    def propose(rng: random.Random) -> tuple[str, tuple[list[int], str, int]]:
        while True:
            nums = [rng.randint(1, max_number) for _ in range(count)]
            expr, value = _random_expr(nums, rng)
            if 1 <= value <= max_target:
                return f"{sorted(nums)}->{value}", (nums, expr, value)

    def build(p: tuple[list[int], str, int], rng: random.Random) -> Sample:
        nums, gold, target = p
        attempts: list[str] = []
        for _ in range(rng.choice([0, 1, 1, 2])):  # a wrong first attempt, then a retry
            for _ in range(20):
                expr, value = _random_expr(nums, rng)
                if value != target and expr not in attempts:
                    attempts.append(expr)
                    break
        lines = [f"{e}={evaluate(e)[0]} no" for e in attempts] + [f"{gold}={target} yes"]
        return Sample(
            messages=[{"role": "user", "content": f"Make {target} from {' '.join(map(str, nums))}"}],
            target=[assistant(gold, "\n".join(lines))],
            answer=gold,
            level=LEVEL,
            family=FAMILY,
            meta={"numbers": nums, "target": target, "attempts": len(attempts)},
        )

    return draw(FAMILY, split, n, seed, propose, build)


def _random_expr(nums: list[int], rng: random.Random) -> tuple[str, int]:
    """A left-nested expression "((a o b) o c) o d" over a shuffle of `nums`, and its value."""
    order = rng.sample(nums, len(nums))
    expr, value = str(order[0]), order[0]
    for i, x in enumerate(order[1:], start=1):
        op = rng.choice("+-*")
        expr = f"{expr}{op}{x}" if i == 1 else f"({expr}){op}{x}"
        value = value + x if op == "+" else value - x if op == "-" else value * x
    return expr, value


def check_expression(content: str, numbers: list[int], target: int) -> bool:
    """`content` ("expr" or "expr=target") uses each of `numbers` exactly once and equals `target`."""
    expr, sep, rhs = content.strip().partition("=")
    if sep and rhs.strip() != str(target):
        return False
    try:
        value, used = evaluate(expr)
    except ValueError:
        return False
    return value == target and sorted(used) == sorted(numbers)


def verify(sample: Sample, parsed: ParsedLike) -> bool:
    return check_expression(parsed.content, sample.meta["numbers"], sample.meta["target"])
