"""The synthetic curriculum: five task families, each a seeded generator plus a verifier, and the
capability levels they define.

    from xinzhou.tasks import LEVELS, generate, verify
    eval_set = generate("arithmetic", "test", 200, seed=0, digits=2)   # held-out 2-digit addition
    ok = verify(eval_set[0], parsed)   # parsed: any object with .reasoning, .content, .tool_calls

A `Sample` holds the prompt (`messages`), the turns a model should produce (`target`; for SFT
the conversation is messages + target), the offered `tools`, and the expected `answer`. Problems
are split into train and test by a hash of the problem (common.split_of), so no test problem is
ever generated for training. `pretrain_text` gives a small plain-text corpus of train problems
and filler sentences for pretraining and tokenizer training, with copying drills (drills.py) if asked.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from xinzhou.tasks import arithmetic, countdown, recall, retrieval, tools
from xinzhou.tasks.drills import drill_text, plain_lookup_text
from xinzhou.tasks.common import Parsed, ParsedLike, Sample, gold_parsed, sentence, split_of, user_text

__all__ = [
    "FAMILIES", "LEVELS", "Level", "Parsed", "ParsedLike", "Sample",
    "conversation", "drill_text", "generate", "gold_parsed", "plain_lookup_text", "pretrain_text", "split_of", "to_text", "verify",
]

FAMILIES: dict[str, ModuleType] = {
    "recall": recall,
    "arithmetic": arithmetic,
    "countdown": countdown,
    "tools": tools,
    "retrieval": retrieval,
}


@dataclass(frozen=True)
class Level:
    level: int
    family: str
    measures: str
    params: dict[str, Any] = field(default_factory=dict)  # generate() params of the eval set
    # "verify": the final answer; "tool_task": L4's whole loop (the right call, then the right answer)
    metric: str = "verify"
    threshold: float = 0.9  # a checkpoint "has" the level when metric >= threshold on held-out samples
    reason: str = ""  # why this threshold
    n: int = 200  # held-out samples to score


_EXACT = "an exact-answer task a model either has or has not learned: 90% leaves room for a few slips"
LEVELS: dict[int, Level] = {
    1: Level(1, "recall", "copy a word sequence; read a value out of a key=value list", {}, "verify", 0.9, _EXACT),
    2: Level(2, "arithmetic", "exact two-digit addition", {"digits": 2, "ops": ("+",)}, "verify", 0.9, _EXACT),
    3: Level(3, "countdown", "search in the thinking: reach a target from 3 numbers with + - *", {},
             "verify", 0.5, "one greedy pass of a search over at most 27 candidates, each a few exact steps: "
             "half the problems shows the search works, where a guess scores about 4%"),
    4: Level(4, "tools", "M2 tool calls with interleaved thinking: the right tool with the right arguments, "
             "then the right answer from the real tool result", {}, "tool_task", 0.9, _EXACT),
    5: Level(5, "retrieval", "find one fact among decoys in ~200 words of filler", {"length": 200}, "verify", 0.8,
             "three facts of the same shape compete; 80% is well above the 33% of picking one at random"),
}


def _family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; expected one of {list(FAMILIES)}")
    return FAMILIES[name]


def generate(family: str, split: str, n: int, seed: int, **params: Any) -> list[Sample]:
    return _family(family).generate(split, n, seed, **params)


def verify(sample: Sample, parsed: ParsedLike) -> bool:
    """Whether the final answer in `parsed` (the last assistant turn) solves `sample`."""
    return _family(sample.family).verify(sample, parsed)


def details(samples: list[Sample], parsed: list[ParsedLike]) -> dict[str, float]:
    """Sub-metrics of a family's answers beyond pass/fail (empty when the family has none), e.g.
    for countdown how many written search steps were exact. `samples` are of one family."""
    if not samples:
        return {}
    fn = getattr(_family(samples[0].family), "details", None)
    return fn(samples, parsed) if fn is not None else {}


def conversation(sample: Sample) -> list[dict]:
    """The full SFT conversation: prompt + target."""
    return sample.messages + sample.target


def to_text(sample: Sample) -> str:
    """A sample as plain text, e.g. "47+38=85" or "Repeat: tiger apple\\ntiger apple".

    Offered tools come first as their function JSON (as the rendered system prompt holds them),
    so a tokenizer trained on this text learns compact merges for the schemas.
    """
    prompt = user_text(sample)
    schemas = "".join(json.dumps(t["function"], ensure_ascii=False) + "\n" for t in sample.tools or [])
    return schemas + prompt + ("" if prompt.endswith("=") else "\n") + sample.answer


def pretrain_text(seed: int, n: int, drills: int = 0, plain_lookups: int = 0,
                  plain_pairs: tuple[int, int] = (6, 12), key_scans: int = 0, drill_names: bool = False,
                  drill_few_words: int = 0) -> list[str]:
    """`n` short plain-text documents: train-split problems of every family and filler paragraphs,
    plus `drills` copying drills (drill_text: with L5's names among their words if `drill_names`,
    repeat lines of `drill_few_words` recurring words if that is set), `plain_lookups` lookup drills
    without a separator of `plain_pairs` pairs (plain_lookup_text) and `key_scans` key-check scans of lists
    (recall.scan_drills, with other lists than an SFT mix of the same seed), shuffled together."""
    rng = random.Random(f"pretrain/{seed}")
    per = -(-n // (len(FAMILIES) + 1))
    docs = [
        to_text(s)
        for name, mod in FAMILIES.items()
        for s in (mod.generate("train", per, seed, length=60) if name == "retrieval" else mod.generate("train", per, seed))
    ]
    docs += [" ".join(sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(per)]
    rng.shuffle(docs)
    docs = (docs[:n] + drill_text(seed, drills, names=drill_names, few_words=drill_few_words)
            + plain_lookup_text(seed, plain_lookups, plain_pairs))
    if drills or plain_lookups:
        rng.shuffle(docs)
    if key_scans:
        docs += recall.scan_drills(seed + 1, key_scans)
        random.Random(seed).shuffle(docs)
    return docs
