"""L5 long-context retrieval: one fact buried in `length` words of filler, asked for at the end.

    The old tiger finds the warm river. ... The code of Hiro is 4821. ... The code of Vera is 1375.
    ... \nWhat is the code of Hiro?                                          -> 4821

Filler sentences contain no digits and no names, so the fact appears exactly once; `decoys`
facts about other people (with other codes) make it retrieval rather than "find the number".

`generate(..., thinking=...)` chooses what a demonstration thinks (the problems and answers are
the same whatever it is):

- "none" (default): the bare answer.
- "fact": the asked fact as the haystack writes it, then the answer:
  `<think> The code of Hiro is 4821.</think>4821`. Each digit of the code is then the token after
  a run of tokens that occurs once in the prompt (" of Hiro is 4 8"), where the bare answer's first
  digit must be found from the question's name, about ten tokens back (the chat template's).

In the tiny speedrun, "fact" with names in the copying drills (Recipe.drill_names) writes the asked
name every time; of the whole codes of facts it then writes, the asked one is a third: it does not
find the fact by its name (docs/levels-log.md).
"""

from __future__ import annotations

import random

from xinzhou.tasks.common import NAMES, ParsedLike, Sample, assistant, draw, sentence

FAMILY = "retrieval"
LEVEL = 5


def fact(name: str, code: int) -> str:
    return f"The code of {name} is {code}."


THINKING = ("none", "fact")


def generate(
    split: str, n: int, seed: int, *, length: int = 200, min_length: int | None = None, decoys: int = 2,
    thinking: str = "none",
) -> list[Sample]:
    """`n` haystacks of about `length` filler words (at least one sentence) plus 1 + `decoys` facts;
    with `min_length`, each haystack's length is drawn uniformly from min_length..length (shorter
    haystacks for training: more problems for the same tokens). `thinking` is the demonstrations'
    thinking, "none" or "fact" (module doc)."""
    if thinking not in THINKING:
        raise ValueError(f"retrieval: thinking = {thinking!r}, expected one of {list(THINKING)}")
    if length < 1 or not 0 <= decoys < len(NAMES):
        raise ValueError(f"retrieval: need length >= 1 and 0 <= decoys < {len(NAMES)}, got {length}, {decoys}")
    if min_length is not None and not 1 <= min_length <= length:
        raise ValueError(f"retrieval: need 1 <= min_length <= length, got {min_length}, {length}")

    def propose(rng: random.Random) -> tuple[str, tuple[str, int]]:
        name, code = rng.choice(NAMES), rng.randint(1000, 9999)
        return f"{name}:{code}", (name, code)

    def build(p: tuple[str, int], rng: random.Random) -> Sample:
        name, code = p
        words_wanted = length if min_length is None else rng.randint(min_length, length)
        sentences, words = [], 0
        while words < words_wanted:
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
            target=[assistant(str(code), " " + fact(name, code) if thinking == "fact" else "")],
            answer=str(code),
            level=LEVEL,
            family=FAMILY,
            meta={"name": name, "code": code, "position": position, "length": words_wanted},
        )

    return draw(FAMILY, split, n, seed, propose, build)


def verify(sample: Sample, parsed: ParsedLike) -> bool:
    return parsed.content.strip() == sample.answer
