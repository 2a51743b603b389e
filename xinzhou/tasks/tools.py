"""L4 tool use with interleaved thinking, in the OpenAI message shape chat_format renders as M2.

A sample offers two tools, `calculator` (a op b on integers) and `get_price` (a catalog lookup
times a quantity), and asks a question only the right tool can answer:

    user       What is 4821*37?
    assistant  thinking "Use calculator." + tool call calculator(a=4821, op="*", b=37)
    tool       178377
    assistant  thinking "The result is 178377." + content "178377"

`execute` is the tools' real implementation (deterministic, no eval, errors returned as text the
way agents feed them back). Three checks: `well_formed_call` (the speedrun metric: a call to an
offered tool whose arguments match its JSON schema), `correct_call` (the right tool and
arguments), and `verify_answer` (the final content).
"""

from __future__ import annotations

import hashlib
import json
import random

from xinzhou.agent.tools import GetPrice, TaskCalculator, Tool
from xinzhou.schema import argument_error
from xinzhou.tasks.common import ParsedLike, Sample, assistant, draw

FAMILY = "tools"
LEVEL = 4
ITEMS = (
    "apple pen book cup lamp chair shirt shoe hat bag clock phone ball kite bike desk plate "
    "spoon fork candle brush towel glove sock card map key rope bowl mug"
).split()
PRICES = {item: 1 + int.from_bytes(hashlib.sha256(item.encode()).digest()[:4], "big") % 20 for item in ITEMS}

# The tools themselves are the agent's classes (xinzhou.agent.tools), so the evals and the agent
# run the same code; these are their definitions as the model sees them.
_IMPLEMENTATIONS: dict[str, Tool] = {t.name: t for t in (TaskCalculator(), GetPrice(PRICES))}
TOOLS: list[dict] = [t.spec() for t in _IMPLEMENTATIONS.values()]


def task_tools() -> dict[str, Tool]:
    """The tools by name, for the agent loop (what `xinzhou.evals` runs L4 with)."""
    return dict(_IMPLEMENTATIONS)


def _function(call: object) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    return fn if isinstance(fn, dict) else {}


def _arguments(call: object) -> object:
    args = _function(call).get("arguments")
    if isinstance(args, str):  # OpenAI wire format carries arguments as a JSON string
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def execute(name: str, arguments: object, tools: list[dict] | None = None) -> str:
    """Run one tool call and return its result as text; a bad call returns "error: ..."."""
    offered = [t["function"]["name"] for t in tools or TOOLS]
    if name not in offered or name not in _IMPLEMENTATIONS:
        return f"error: unknown tool {name!r}; available: {offered}"
    return _IMPLEMENTATIONS[name](arguments).content


KINDS = ("calculator", "get_price", "total")


def _call(i: int, name: str, args: dict) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}


def _total(args: dict) -> Sample:
    """The multi-step kind: two prices in one turn (parallel calls), then their sum by the
    calculator, then the answer: three model turns, each thinking about what the last one found."""
    (i1, q1), (i2, q2) = args["items"]
    r1, r2 = execute("get_price", {"item": i1, "quantity": q1}), execute("get_price", {"item": i2, "quantity": q2})
    add = {"a": int(r1), "op": "+", "b": int(r2)}
    total = execute("calculator", add)
    return Sample(
        messages=[{"role": "user", "content": f"What do {q1} {i1}s and {q2} {i2}s cost together?"}],
        target=[
            assistant("", f"Price the {i1}s and the {i2}s, then add.",
                      [_call(0, "get_price", {"item": i1, "quantity": q1}),
                       _call(1, "get_price", {"item": i2, "quantity": q2})]),
            {"role": "tool", "tool_call_id": "call_0", "content": r1},
            {"role": "tool", "tool_call_id": "call_1", "content": r2},
            assistant("", f"The {i1}s cost {r1}, the {i2}s {r2}: add them.", [_call(2, "calculator", add)]),
            {"role": "tool", "tool_call_id": "call_2", "content": total},
            assistant(total, f"The total is {total}."),
        ],
        answer=total, level=LEVEL, family=FAMILY, tools=TOOLS,
        meta={"tool": "total", "arguments": args, "steps": 3},
    )


def generate(
    split: str, n: int, seed: int, *, kinds: tuple[str, ...] = ("calculator", "get_price")
) -> list[Sample]:
    """`n` questions of `kinds`: "calculator" and "get_price" need one call (the L4 set), "total"
    three model turns (two prices, their sum, the answer); both tools are always offered."""
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"tools: kinds must be a non-empty subset of {KINDS}, got {kinds!r}")

    def propose(rng: random.Random) -> tuple[str, tuple[str, dict]]:
        kind = rng.choice(kinds)
        if kind == "calculator":
            args = {"a": rng.randint(100, 9999), "op": rng.choice("+-*"), "b": rng.randint(10, 999)}
            return f"calculator:{args['a']}{args['op']}{args['b']}", ("calculator", args)
        if kind == "total":
            i1, i2 = rng.sample(ITEMS, 2)
            args = {"items": [[i1, rng.randint(2, 99)], [i2, rng.randint(2, 99)]]}
            return f"total:{json.dumps(args['items'])}", ("total", args)
        args = {"item": rng.choice(ITEMS), "quantity": rng.randint(2, 99)}
        return f"get_price:{args['item']}:{args['quantity']}", ("get_price", args)

    def build(p: tuple[str, dict], rng: random.Random) -> Sample:
        name, args = p
        if name == "total":
            return _total(args)
        if name == "calculator":
            question = f"What is {args['a']}{args['op']}{args['b']}?"
        else:
            question = f"What do {args['quantity']} {args['item']}s cost?"
        result = execute(name, args)
        call = _call(0, name, args)
        return Sample(
            messages=[{"role": "user", "content": question}],
            target=[
                assistant("", f"Use {name}.", [call]),
                {"role": "tool", "tool_call_id": "call_0", "content": result},
                assistant(result, f"The result is {result}."),
            ],
            answer=result,
            level=LEVEL,
            family=FAMILY,
            tools=TOOLS,
            meta={"tool": name, "arguments": args},
        )

    return draw(FAMILY, split, n, seed, propose, build)


def well_formed_call(parsed: ParsedLike, tools: list[dict]) -> bool:
    """At least one tool call, and every call names an offered tool with schema-valid arguments."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    calls = parsed.tool_calls or []
    return bool(calls) and all(
        _function(c).get("name") in schemas and argument_error(_arguments(c), schemas[_function(c)["name"]]) is None
        for c in calls
    )


def correct_call(parsed: ParsedLike, sample: Sample) -> bool:
    """Exactly one well-formed call, to the tool the question needs, with the gold arguments."""
    calls = parsed.tool_calls or []
    return (
        len(calls) == 1
        and well_formed_call(parsed, sample.tools or TOOLS)
        and _function(calls[0]).get("name") == sample.meta["tool"]
        and _arguments(calls[0]) == sample.meta["arguments"]
    )


def verify_answer(parsed: ParsedLike, sample: Sample) -> bool:
    """The final assistant content is exactly the tool-derived answer."""
    return parsed.content.strip() == sample.answer


def verify(sample: Sample, parsed: ParsedLike) -> bool:
    return verify_answer(parsed, sample)
