"""L1 recall and copying: repeat a word sequence, or read one value out of a key=value list.

    Repeat: tiger apple stone        -> tiger apple stone
    c=ocean f=mango a=lemon\nf?      -> mango

A copy is demonstrated with the space its words have in the prompt (" tiger apple stone"), so
that every word of the answer is the same token as in the prompt and copying is the same step
from the first word to the last (unspaced, the first word is another token, and a model that
copies the rest can miss it); the verifier strips the space, so either form passes.

`generate(..., thinking=...)` chooses what a key lookup's demonstration thinks (the problems and
answers are the same whatever it is):

- "none" (default): the bare answer.
- "scan": the pairs in the prompt's order up to and including the asked key's, each with the asked
  key between its key and value, so that each step is copying the next pair and comparing two
  keys side by side: `<think>c:f=ocean f:f=mango</think>mango`.
- "pair": the asked pair, its key in the list's spaced form: `<think> f=mango</think>mango`.

In the tiny speedrun neither reaches the key: with "scan" the model copies the pairs and stops
after one of them by position, not by its key; with "pair" it writes the key and a value from
the wrong pair (experiments/induction/README.md).
"""

from __future__ import annotations

import random
import string

from xinzhou.tasks.common import ParsedLike, Sample, assistant, draw, WORDS

FAMILY = "recall"
LEVEL = 1


def generate(
    split: str, n: int, seed: int, *, min_words: int = 3, max_words: int = 6, kv_fraction: float = 0.5,
    thinking: str = "none",
) -> list[Sample]:
    """`n` problems; a `kv_fraction` of them are key lookups over min_words..max_words pairs.
    `thinking` is the key lookups' demonstrated thinking: "none", "scan" or "pair" (module doc)."""
    if thinking not in THINKING:
        raise ValueError(f"recall: thinking = {thinking!r}, expected one of {list(THINKING)}")
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
        if kind == "repeat":  # the prompt's words with their spaces (module doc); verify strips the space
            content, reasoning = prompt.removeprefix("Repeat:"), ""
        else:
            content, reasoning = answer, THINKING[thinking](prompt)
        return Sample(
            messages=[{"role": "user", "content": prompt}],
            target=[assistant(content, reasoning)],
            answer=answer,
            level=LEVEL,
            family=FAMILY,
            meta={"kind": kind},
        )

    return draw(FAMILY, split, n, seed, propose, build)


def _solve(prompt: str) -> str:
    if prompt.startswith("Repeat: "):
        return prompt.removeprefix("Repeat: ")
    pairs, asked = _parts(prompt)
    return dict(kv.split("=") for kv in pairs.split())[asked]


def _scan(prompt: str) -> str:
    """thinking="scan": the list's pairs up to and including the asked key's, each written
    `key:asked=value` ("c:f=ocean f:f=mango" for "c=ocean f=mango a=lemon\nf?")."""
    pairs, asked = _parts(prompt)
    out = []
    for kv in pairs.split():
        key, value = kv.split("=")
        out.append(f"{key}:{asked}={value}")
        if key == asked:
            return " ".join(out)
    raise ValueError(f"recall: key {asked!r} is not in the list {pairs!r}")


def _pair(prompt: str) -> str:
    """thinking="pair": the asked pair with the key in the list's spaced form (" f=mango")."""
    pairs, asked = _parts(prompt)
    for kv in pairs.split():
        if kv.split("=")[0] == asked:
            return f" {kv}"
    raise ValueError(f"recall: key {asked!r} is not in the list {pairs!r}")


def _parts(prompt: str) -> tuple[str, str]:
    pairs, query = prompt.split("\n")
    return pairs, query.removesuffix("?")


THINKING = {"none": lambda prompt: "", "scan": _scan, "pair": _pair}


def verify(sample: Sample, parsed: ParsedLike) -> bool:
    return parsed.content.strip() == sample.answer
