"""Copying drills for pretraining: dense practice of the in-context copying that L1 needs.

A task sample trains one answer (a few tokens) per problem; a drill document asks for the same
skill at every line, and pretraining trains every token. Two kinds, in the shapes L1 uses:

    repeat:  a word sequence (3-8 words; 6-10 of a few recurring ones with `few_words`) written
             two to four times, one per line
    lookup:  7-12 k=value pairs, then four "k? value" lines

and a third, `plain_lookup_text`: lookups without a separator, "k value" pairs on one line, then
every key again in a random order with its value. With pre-norm blocks (MiniMax-M2's) a model
learns these far sooner than lookups through `=`, and once it has, the `=` form within a few
hundred steps (experiments/induction: from scratch, the `=` form stalls at "a value not asked
yet" for thousands of steps; the recipe's post-norm blocks learn neither).

No drill contains a problem of the levels, by construction: no line says "Repeat:", and the
question that follows a lookup list asks for a key outside its last six pairs (an L1 list has at
most six, and its question is on one of them). Recipe.pretrain_drills and Recipe.sft_drills add
them to a speedrun's pretraining and SFT; experiments/induction/ measures what they do.
"""

from __future__ import annotations

import random
import string

from xinzhou.tasks.common import NAMES, WORDS


def drill_text(seed: int, n: int, names: bool = False, few_words: int = 0) -> list[str]:
    """`n` drill documents, the kinds in turn (deterministic in seed). With `names`, their words are
    drawn from the task words and L5's person names together: names occur in no other pretraining
    text than retrieval's facts, and a model that never copied one does not copy a name when asked
    to (docs/levels-log.md). With `few_words` (2-5), each repeat drill writes a line of 6-10 words
    drawn from that many, so that words recur in it and the last word alone does not say which
    comes next: a copy must follow its place in the line."""
    if few_words != 0 and not 2 <= few_words <= 5:
        raise ValueError(f"drills: few_words must be 0 (off) or 2-5 (fewer than a line's 6 words), got {few_words}")
    rng = random.Random(f"drills/{seed}")
    words = WORDS + NAMES if names else WORDS
    return [_repeat(rng, words, few_words) if i % 2 == 0 else _lookup(rng, words) for i in range(n)]


def _repeat(rng: random.Random, words: list[str], few_words: int) -> str:
    if few_words:
        pool = rng.sample(words, few_words)
        line = " ".join(rng.choice(pool) for _ in range(rng.randint(6, 10)))
    else:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
    return "\n".join([line] * rng.randint(2, 4))


def plain_lookup_text(seed: int, n: int, pairs: tuple[int, int] = (6, 12)) -> list[str]:
    """`n` lookup drills without a separator (deterministic in seed): `pairs` "k value" pairs, then
    every key once more in a random order, each with its value (`c ocean f mango a lemon` /
    `f mango c ocean a lemon`). No L1 problem is a substring: those have `=` and `?`."""
    rng = random.Random(f"plain-lookups/{seed}")
    docs = []
    for _ in range(n):
        keys = rng.sample(string.ascii_lowercase, rng.randint(*pairs))
        values = {k: rng.choice(WORDS) for k in keys}
        asked = rng.sample(keys, len(keys))
        docs.append(" ".join(f"{k} {values[k]}" for k in keys) + "\n" + " ".join(f"{k} {values[k]}" for k in asked))
    return docs


def _lookup(rng: random.Random, words: list[str]) -> str:
    keys = rng.sample(string.ascii_lowercase, rng.randint(7, 12))
    values = {k: rng.choice(words) for k in keys}
    pairs = " ".join(f"{k}={v}" for k, v in values.items())
    # the first question (the one line that follows the list) asks for a key outside its last six
    # pairs, so no L1 problem (at most six pairs, then a question on one of them) is a substring
    first = rng.choice(keys[:-6])
    questions = [first] + rng.sample([k for k in keys if k != first], 3)
    return pairs + "".join(f"\n{k}? {values[k]}" for k in questions)

