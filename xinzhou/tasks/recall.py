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
- "check": the pairs up to and including the asked key's, each key written beside the asked one
  (both in the list's spaced form, so that equal keys are one token twice) with a verdict, then
  the pair's value: `<think> c: f no=ocean f: f yes=mango</think>mango`. `check_drills` writes
  balanced bare checks of this form for the training mix.

In the tiny speedrun neither "scan" nor "pair" reaches the key: with "scan" the model copies the
pairs and stops after one of them by position, not by its key; with "pair" it writes the key and
a value from the wrong pair. "check" alone gets the verdict wrong; with `scan_drills` in the
training mix (whole scans of a list, "yes" anywhere in them) it learns the verdict and keeps the
copy (experiments/induction/README.md, "Key checks, and scans of the whole list").
"""

from __future__ import annotations

import random
import string

from xinzhou.tasks.common import ParsedLike, Sample, assistant, draw, split_of, WORDS

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


def check_text(key: str, asked: str, value: str) -> str:
    """One check of the "check" thinking: " c: f no=ocean" (key c, asked f, value ocean)."""
    return f" {key}: {asked} {'yes' if key == asked else 'no'}={value}"


def _check(prompt: str) -> str:
    """thinking="check": " c: f no=ocean f: f yes=mango" for "c=ocean f=mango a=lemon\nf?"."""
    pairs, asked = _parts(prompt)
    out = []
    for kv in pairs.split():
        key, value = kv.split("=")
        out.append(check_text(key, asked, value))
        if key == asked:
            return "".join(out)
    raise ValueError(f"recall: key {asked!r} is not in the list {pairs!r}")


def check_drills(seed: int, n: int, checks: int = 16) -> list[str]:
    """`n` plain-text documents of `checks` key checks each, in the form of the "check" thinking
    (" c: f no=ocean q: q yes=mango"): two keys side by side, equal in half the checks, each check
    with its own keys and a random value. Dense, balanced practice of the one decision a lookup
    needs, where a lookup's own thinking says "yes" once and last. No document holds a held-out
    problem: none has a key=value list or a question."""
    rng = random.Random(f"recall-checks/{seed}")
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(checks):
            key = rng.choice(string.ascii_lowercase)
            asked = key if rng.random() < 0.5 else rng.choice(string.ascii_lowercase.replace(key, ""))
            parts.append(check_text(key, asked, rng.choice(WORDS)))
        docs.append("".join(parts))
    return docs


def scan_drills(seed: int, n: int, scans: int = 3, min_words: int = 3, max_words: int = 6) -> list[str]:
    """`n` plain-text documents, each a key=value list and `scans` whole scans of it in the form of
    the "check" thinking, one line each, for keys asked in a random order:

        c=ocean f=mango a=lemon
         c: f no=ocean f: f yes=mango a: f no=lemon
         c: a no=ocean f: a no=mango a: a yes=lemon

    Every pair is written, so the key of each check is the list's next key wherever the asked one
    is, and "yes" stands at every position of a scan, not only at its end. A list is used only if
    every question it could be asked is a training problem of L1 (tasks.common.split_of), and no
    document has a question ("f?")."""
    rng = random.Random(f"recall-scans/{seed}")
    docs = []
    while len(docs) < n:
        keys = rng.sample(string.ascii_lowercase, rng.randint(min_words, max_words))
        pairs = [(k, rng.choice(WORDS)) for k in keys]
        listed = " ".join(f"{k}={v}" for k, v in pairs)
        if any(split_of(f"{listed}\n{k}?") == "test" for k in keys):
            continue
        lines = [listed]
        for asked in rng.sample(keys, min(scans, len(keys))):
            lines.append("".join(check_text(k, asked, v) for k, v in pairs))
        docs.append("\n".join(lines))
    return docs


def _parts(prompt: str) -> tuple[str, str]:
    pairs, query = prompt.split("\n")
    return pairs, query.removesuffix("?")


THINKING = {"none": lambda prompt: "", "scan": _scan, "pair": _pair, "check": _check}


def verify(sample: Sample, parsed: ParsedLike) -> bool:
    return parsed.content.strip() == sample.answer
