"""Shared pieces of the task families: the `Sample` record, the parsed-output shape verifiers
accept, the hash-based train/test split, the seeded draw loop, and a small word list.

A problem belongs to exactly one split, decided by a hash of its key (e.g. "47+38"), so a test
problem can never be generated for training, whatever the seed or the number of samples.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

Split = Literal["train", "test"]
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class Sample:
    messages: list[dict]  # the prompt: every message before the turns the model must produce
    target: list[dict]  # assistant (and, for tool tasks, tool) messages; prompt + target = SFT conversation
    answer: str  # the expected final answer, as the final assistant content
    level: int
    family: str
    tools: list[dict] | None = None  # OpenAI-format tool definitions offered in the prompt
    meta: dict[str, Any] = field(default_factory=dict)  # always holds "key" (the split key) and "split"


class ParsedLike(Protocol):
    """What chat_format's output parser returns; verifiers need only these three attributes."""

    reasoning: str
    content: str
    tool_calls: list[dict]


@dataclass(frozen=True)
class Parsed:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


def gold_parsed(message: dict) -> Parsed:
    """The parse a perfect model would produce for an assistant `message` of a target."""
    return Parsed(
        reasoning=message.get("reasoning_content", "") or "",
        content=message.get("content", "") or "",
        tool_calls=list(message.get("tool_calls", []) or []),
    )


def assistant(content: str, reasoning: str = "", tool_calls: list[dict] | None = None) -> dict:
    msg: dict = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def split_of(key: str) -> Split:
    """The split a problem belongs to: the top 64 bits of sha256(key) below TEST_FRACTION -> test."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "test" if h < TEST_FRACTION * 2**64 else "train"


P = TypeVar("P")


def draw(
    family: str,
    split: str,
    n: int,
    seed: int,
    propose: Callable[[random.Random], tuple[str, P]],
    build: Callable[[P, random.Random], Sample],
) -> list[Sample]:
    """Propose problems with a seeded RNG, keep those whose key hashes into `split`, build `n`.

    The test split never repeats a problem (an eval set of distinct problems); train may repeat,
    since small spaces (two-digit addition has 8100 problems) must still fill large SFT sets.
    """
    if split not in ("train", "test"):
        raise ValueError(f"{family}: split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"{family}: n must be >= 0, got {n}")
    rng = random.Random(f"{family}/{split}/{seed}")
    out: list[Sample] = []
    seen: set[str] = set()
    for _ in range(1000 * n + 10_000):
        if len(out) == n:
            break
        key, problem = propose(rng)
        if split_of(key) != split or (split == "test" and key in seen):
            continue
        seen.add(key)
        s = build(problem, rng)
        s.meta.update(key=key, split=split)
        out.append(s)
    if len(out) < n:
        raise ValueError(
            f"{family}: could only draw {len(out)} distinct {split} problems of the {n} asked; "
            "ask for fewer or widen the parameters"
        )
    return out


def user_text(sample: Sample) -> str:
    """The last user message of the prompt."""
    return next(m["content"] for m in reversed(sample.messages) if m["role"] == "user")


# Short, common words: each is one or two BPE tokens, which keeps samples short.
WORDS = (
    "apple river stone cloud green quiet table music light paper happy water train lemon "
    "garden window silver bread smile ocean forest tiger candle yellow winter summer rabbit "
    "mirror basket planet rocket pencil orange purple castle dragon island jacket kitten "
    "ladder marble needle pillow rubber saddle thunder valley wagon zebra anchor button "
    "copper desert engine feather guitar hammer insect jungle kettle meadow napkin oyster "
    "parrot quartz ribbon spider tomato violet walnut barrel cactus dinner falcon ginger "
    "harbor igloo jigsaw koala lizard mango noodle otter pepper quilt raven salmon tulip"
).split()
NAMES = (
    "Alice Bruno Chen Dara Elena Farid Grace Hiro Ines Jonas Kira Liam Mina Noor Omar Petra "
    "Quinn Rosa Sami Tara Umar Vera Wen Xena Yuri Zoe Anton Bella Carlos Dmitri Eva Felix "
    "Greta Hugo Ivan Julia Karl Lena Marco Nadia"
).split()
_ADJ = "big small red old new quiet bright dark soft warm cold tall".split()
_VERB = "sees finds likes moves holds follows paints carries watches visits".split()


def sentence(rng: random.Random) -> str:
    """A filler sentence with no digits and no names (so it never contains a retrieval fact)."""
    return (
        f"The {rng.choice(_ADJ)} {rng.choice(WORDS)} {rng.choice(_VERB)} "
        f"the {rng.choice(_ADJ)} {rng.choice(WORDS)}."
    )
