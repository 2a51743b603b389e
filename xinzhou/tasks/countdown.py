"""L3 countdown: combine the given numbers, each exactly once, with + - * to reach the target.

    Make 32 from 3 5 4   -> thinking "3+5=8 8+4=12:32 8*4=32:32 yes", content "(3+5)*4"
    Make 11 from 3 5 4   -> thinking "3+5=8 8+4=12:11 8*4=32:11 8-4=4:11\n3*5=15 15+4=19:11 15*4=60:11 15-4=11:11 yes",
                            content "(3*5)-4"

The thinking is a search a model can carry out, not a guess: `search` tries the candidates in a
fixed order, one line per first step (a pair of the numbers and an operation), each line
computing that step and then each way of combining its result with the third number, one
operation at a time, until a result equals the target. Each result is followed by ":" and the
target, so the check is a comparison of two numbers side by side rather than a look back at the
prompt (a first version without it computed the hits right and still passed them by); the hit
ends in " yes", and the answer is the hit written as one expression. Subtraction always takes the
smaller from the larger (a negative or zero value never reaches a target of 1 or more), so every
step is a small exact computation like L2's. `verify` accepts any expression that
`evaluate` parses, e.g. "4*(5+3)" or "(3+5)*4=32". Expressions are parsed by a small
recursive-descent parser, never `eval`.
"""

from __future__ import annotations

import random
import re

from xinzhou.tasks.common import ParsedLike, Sample, assistant, draw, split_of

FAMILY = "countdown"
LEVEL = 3
MAX_CHARS = 200  # bounds the parser's recursion depth and the size of any value
MAX_DIGITS = 6
_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*()]))")
_STEP = re.compile(r"(?<![0-9])([0-9]{1,6})([-+*])([0-9]{1,6})=([0-9]{1,7})(?![0-9])")  # "8*4=32" in a search


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


def generate(split: str, n: int, seed: int, *, max_number: int = 15, max_target: int = 99) -> list[Sample]:
    """`n` problems of 3 numbers in 1..max_number with a reachable target in 1..max_target."""
    if max_number < 1 or max_target < 1:
        raise ValueError(f"countdown: need max_number >= 1, max_target >= 1; got {max_number}, {max_target}")

    def propose(rng: random.Random) -> tuple[str, tuple[list[int], int]]:
        while True:
            nums = [rng.randint(1, max_number) for _ in range(3)]
            value = _random_value(nums, rng)
            if 1 <= value <= max_target:
                return f"{sorted(nums)}->{value}", (nums, value)

    def build(p: tuple[list[int], int], rng: random.Random) -> Sample:
        nums, target = p
        lines, answer = search(nums, target)
        return Sample(
            messages=[{"role": "user", "content": f"Make {target} from {' '.join(map(str, nums))}"}],
            target=[assistant(answer, "\n".join(lines))],
            answer=answer,
            level=LEVEL,
            family=FAMILY,
            meta={"numbers": nums, "target": target, "attempts": len(lines) - 1},  # lines that missed
        )

    return draw(FAMILY, split, n, seed, propose, build)


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _random_value(nums: list[int], rng: random.Random) -> int:
    """The value of a left-nested expression "((a o b) o c) o d" over a shuffle of `nums`: a target
    that `search` reaches by construction."""
    order = rng.sample(nums, len(nums))
    value = order[0]
    for x in order[1:]:
        value = _apply(value, rng.choice("+-*"), x)
    return value


def _step(x: int, op: str, y: int) -> tuple[str, int]:
    """One operation as the search writes it ("8*4"), subtraction larger minus smaller, and its value."""
    if op == "-" and x < y:
        x, y = y, x
    return f"{x}{op}{y}", _apply(x, op, y)


def step_drills(seed: int, n: int, steps: int = 24, max_number: int = 15) -> list[str]:
    """`n` plain-text documents of `steps` search steps each, as `search` writes them: a first step
    on two numbers in 1..max_number, or a second step on such a step's value and a third number
    (half each), by + * - with the smaller taken from the larger. Dense practice of the arithmetic
    a search is made of. No document holds a held-out problem: none says "Make ...", and a step
    whose text hashes into the test split (L2's key of "12+14" is that text) is drawn again."""
    rng = random.Random(f"countdown-steps/{seed}")
    docs = []
    for _ in range(n):
        parts = []
        while len(parts) < steps:
            a, b = rng.randint(1, max_number), rng.randint(1, max_number)
            if rng.random() < 0.5:  # a second step: the value of a first step, then the third number
                a = _step(a, rng.choice("+*-"), b)[1]
                b = rng.randint(1, max_number)
            text, value = _step(a, rng.choice("+*-"), b)
            if split_of(text) == "train":  # "12+14" may be a held-out L2 problem (its key is the same text)
                parts.append(f"{text}={value}")
        docs.append(" ".join(parts))
    return docs


def check_drills(seed: int, n: int, checks: int = 16, max_number: int = 15, max_target: int = 99) -> list[str]:
    """`n` plain-text documents of `checks` search checks each, as `search` writes them: a second
    step (a first step's value on two numbers in 1..max_number, then a third number), its value, ":"
    and a target in 1..max_target, then " yes" when the two are equal ("9*4=36:36 yes 4+11=15:22").
    Half the checks are hits and a quarter near misses (a digit changed, or off by 1-3), where a
    search has one hit among up to 27 checks: dense, balanced practice of the comparison. Each check
    has its own target, written after the value, so that the value cannot be learned from the
    target (with one target a document, the model learned to write the target as a value it had
    not computed). No document holds a held-out problem (none says "Make"; a step whose text is in
    the test split is drawn again, as in `step_drills`)."""
    rng = random.Random(f"countdown-checks/{seed}")
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(checks):
            r = rng.random()  # < 0.5: a hit, < 0.75: a near miss, else any other target
            while True:
                a, b, c = (rng.randint(1, max_number) for _ in range(3))
                text, value = _step(_step(a, rng.choice("+*-"), b)[1], rng.choice("+*-"), c)
                near = [t for t in _near(value) if t <= max_target]
                if split_of(text) == "train" and (1 <= value <= max_target if r < 0.5 else near or r >= 0.75):
                    break
            if r < 0.5:
                target = value
            elif r < 0.75:
                target = rng.choice(near)
            else:
                target = value
                while target == value:
                    target = rng.randint(1, max_target)
            parts.append(f"{text}={value}:{target}" + (" yes" if value == target else ""))
        docs.append(" ".join(parts))
    return docs


def _near(t: int) -> list[int]:
    """The values one digit away from `t` (same length) or 1-3 from it, positive and not `t`."""
    out = {t + d for d in (-3, -2, -1, 1, 2, 3)}
    digits = str(t)
    for i in range(len(digits)):
        for d in "0123456789":
            if d != digits[i] and (i or d != "0" or len(digits) == 1):
                out.add(int(digits[:i] + d + digits[i + 1:]))
    return sorted(w for w in out if w >= 1 and w != t)


def search(nums: list[int], target: int) -> tuple[list[str], str]:
    """The thinking lines of the fixed-order search over three numbers and the expression it finds.

    First steps in order: the pairs (n0, n1), (n0, n2), (n1, n2), each with + * -; after each, its
    value with the remaining number by + * -. Raises ValueError if no candidate reaches `target`
    (every generated problem is reachable: its target is the value of such an expression).
    """
    if len(nums) != 3:
        raise ValueError(f"countdown search: needs 3 numbers, got {len(nums)}")
    n0, n1, n2 = nums
    lines = []
    for a, b, c in ((n0, n1, n2), (n0, n2, n1), (n1, n2, n0)):
        for op1 in "+*-":
            first, v = _step(a, op1, b)
            parts = [f"{first}={v}"]
            for op2 in "+*-":
                second, w = _step(v, op2, c)
                parts.append(f"{second}={w}:{target}")  # the target beside each result: a local check
                if w == target:
                    lines.append(" ".join(parts) + " yes")
                    inner = f"({first})"
                    return lines, (f"{c}-{inner}" if op2 == "-" and v < c else f"{inner}{op2}{c}")
            lines.append(" ".join(parts))
    raise ValueError(f"countdown search: {target} is not reachable from {nums}")


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


def details(samples: list[Sample], parsed: list[ParsedLike]) -> dict[str, float]:
    """Where a search goes wrong: "steps exact", the written steps ("8*4=32") whose value is right,
    over all the samples' thinking; "search exact", the samples whose thinking is their reference
    search (the sample's own target), line for line (a pass can still come from a search with a slip)."""
    right = written = exact = 0
    for sample, p in zip(samples, parsed):
        thinking = p.reasoning.strip()
        for a, op, b, value in _STEP.findall(thinking):
            written += 1
            right += _apply(int(a), op, int(b)) == int(value)
        exact += thinking == sample.target[-1]["reasoning_content"]
    return {"steps exact": right / written if written else 0.0, "search exact": exact / len(samples)}


def verify(sample: Sample, parsed: ParsedLike) -> bool:
    return check_expression(parsed.content, sample.meta["numbers"], sample.meta["target"])
