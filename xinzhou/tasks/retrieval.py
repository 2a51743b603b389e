"""L5 long-context retrieval: one fact buried in `length` words of filler, asked for at the end.

    The old tiger finds the warm river. ... The code of Hiro is 4821. ... The code of Vera is 1375.
    ... \nWhat is the code of Hiro?                                          -> 4821

Filler sentences contain no digits and no names, so the fact appears exactly once; `decoys`
facts about other people (with other codes) make it retrieval rather than "find the number".
"""

from __future__ import annotations

import random

from xinzhou.tasks.common import NAMES, ParsedLike, Sample, assistant, draw, sentence

FAMILY = "retrieval"
LEVEL = 5


def fact(name: str, code: int) -> str:
    return f"The code of {name} is {code}."


def generate(split: str, n: int, seed: int, *, length: int = 200, decoys: int = 2) -> list[Sample]:
    """`n` haystacks of about `length` filler words (at least one sentence) plus 1 + `decoys` facts."""
    if length < 1 or not 0 <= decoys < len(NAMES):
        raise ValueError(f"retrieval: need length >= 1 and 0 <= decoys < {len(NAMES)}, got {length}, {decoys}")

    def propose(rng: random.Random) -> tuple[str, tuple[str, int]]:
        name, code = rng.choice(NAMES), rng.randint(1000, 9999)
        return f"{name}:{code}", (name, code)

    def build(p: tuple[str, int], rng: random.Random) -> Sample:
        name, code = p
        sentences, words = [], 0
        while words < length:
            sentences.append(sentence(rng))
            words += len(sentences[-1].split())
        others = rng.sample([x for x in NAMES if x != name], decoys)
        codes: list[int] = []
        while len(codes) < decoys:
            c = rng.randint(1000, 9999)
            if c != code and c not in codes:
                codes.append(c)
        facts = [fact(name, code)] + [fact(o, c) for o, c in zip(others, codes)]
        slots = sorted(rng.sample(range(len(sentences) + len(facts)), len(facts)))
        order = rng.sample(facts, len(facts))
        for slot, f in zip(slots, order):
            sentences.insert(slot, f)
        position = sentences.index(facts[0]) / max(1, len(sentences) - 1)
        prompt = " ".join(sentences) + f"\nWhat is the code of {name}?"
        return Sample(
            messages=[{"role": "user", "content": prompt}],
            target=[assistant(str(code))],
            answer=str(code),
            level=LEVEL,
            family=FAMILY,
            meta={"name": name, "code": code, "position": position, "length": length},
        )

    return draw(FAMILY, split, n, seed, propose, build)


def verify(sample: Sample, parsed: ParsedLike) -> bool:
    return parsed.content.strip() == sample.answer
