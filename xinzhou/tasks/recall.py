"""L1 recall and copying: repeat a word sequence, or read one value out of a key=value list.

    Repeat: tiger apple stone        -> tiger apple stone
    c=ocean f=mango a=lemon\nc?      -> ocean
"""

from __future__ import annotations

import random
import string

from xinzhou.tasks.common import ParsedLike, Sample, assistant, draw, WORDS

FAMILY = "recall"
LEVEL = 1


def generate(
    split: str, n: int, seed: int, *, min_words: int = 3, max_words: int = 6, kv_fraction: float = 0.5
) -> list[Sample]:
    """`n` problems; a `kv_fraction` of them are key lookups over min_words..max_words pairs."""
    if not 1 <= min_words <= max_words <= len(string.ascii_lowercase):
        raise ValueError(f"recall: need 1 <= min_words <= max_words <= 26, got {min_words}, {max_words}")

    def propose(rng: random.Random) -> tuple[str, tuple[str, str]]:
        k = rng.randint(min_words, max_words)
        if rng.random() < kv_fraction:
            keys = rng.sample(string.ascii_lowercase, k)
            pairs = " ".join(f"{key}={rng.choice(WORDS)}" for key in keys)
            prompt = f"{pairs}\n{rng.choice(keys)}?"
        else:
            prompt = "Repeat: " + " ".join(rng.choice(WORDS) for _ in range(k))
        return prompt, (prompt, _solve(prompt))

    def build(p: tuple[str, str], rng: random.Random) -> Sample:
        prompt, answer = p
        kind = "repeat" if prompt.startswith("Repeat: ") else "kv"
        return Sample(
            messages=[{"role": "user", "content": prompt}],
            target=[assistant(answer)],
            answer=answer,
            level=LEVEL,
            family=FAMILY,
            meta={"kind": kind},
        )

    return draw(FAMILY, split, n, seed, propose, build)


def _solve(prompt: str) -> str:
    if prompt.startswith("Repeat: "):
        return prompt.removeprefix("Repeat: ")
    pairs, query = prompt.split("\n")
    return dict(kv.split("=") for kv in pairs.split())[query.rstrip("?")]


def verify(sample: Sample, parsed: ParsedLike) -> bool:
    return parsed.content.strip() == sample.answer
