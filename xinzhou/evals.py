"""Capability levels: run the held-out task sets through a client (a local model, or any
endpoint in any protocol: xinzhou.agent.client) and score them with the tasks' verifiers.

    with local_client(model, tokenizer) as client:          # or make_client("openai", url, name, temperature=0)
        results = capability_report(client, levels=(1, 2, 3, 4, 5), n=200)
    print(report_markdown(results))

Each level has a metric and a threshold (xinzhou.tasks.LEVELS): a checkpoint "has" a level when
its score on held-out samples reaches the threshold. Scores come with a 95% Wilson interval and
their n. L4 runs the agent loop (xinzhou.agent.loop.run, the task tools, two model calls at most):
the calls of the first assistant turn are executed, their results sent back with the turn's
thinking, and the model answers; a sample passes only with the right tool and the right arguments
(exactly one call) and then the right final answer. Well-formed calls, right calls and right
answers are reported beside the score. Every turn has at most EVAL_MAX_TOKENS new tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from concurrent.futures import ThreadPoolExecutor

from xinzhou import tasks
from xinzhou.agent.client import Client, EngineClient, Turn
from xinzhou.agent.loop import Error, Final, run
from xinzhou.cache import cache_sizes
from xinzhou.chat_format import ParsedMessage
from xinzhou.model import XinzhouLM
from xinzhou.tasks import tools as tool_task
from xinzhou.tokenizer import Tokenizer


@dataclass
class LevelResult:
    level: int
    family: str
    measures: str
    metric: str
    score: float
    threshold: float
    n: int
    answer_accuracy: float  # final-answer accuracy (equal to score where the metric is the answer)
    examples: list[dict] = field(default_factory=list)  # a few (prompt, output, ok) for the report
    details: dict[str, float] = field(default_factory=dict)  # sub-metrics (L4: well-formed, right call, ...)
    outcomes: list[bool] = field(default_factory=list)  # pass or fail of each held-out sample, in order
    seed: int = 0  # which held-out samples (with the family and n): equal seeds and n are the same problems

    @property
    def passed(self) -> bool:
        return self.score >= self.threshold

    @property
    def ci(self) -> tuple[float, float]:
        """95% Wilson score interval of the score over n samples."""
        return wilson(round(self.score * self.n), self.n)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (sound at 0% and 100%, unlike p +- z*se)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0% and 100% the bound is exactly 0 or 1 (in floats centre -/+ half can miss it by 1e-16)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


EVAL_MAX_TOKENS = 512  # new tokens per assistant turn, for every level and client (L3's longest search: ~440)


def parsed(turn: Turn) -> ParsedMessage:
    """A client's turn in the shape the verifiers read (OpenAI-shaped tool calls)."""
    return ParsedMessage(turn.reasoning, turn.content, [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in turn.tool_calls])


def _shown(turn: Turn) -> str:
    calls = "".join(f"[{c.name}({c.arguments})]" for c in turn.tool_calls)
    return f"<think>{turn.reasoning}</think>{turn.content}{calls}"


def _tool_loop(client: Client, sample: tasks.Sample) -> tuple[Turn, Turn | None]:
    """L4 through the agent loop: the first turn, and the turn after the tool results (None when
    the first turn called nothing). Two model calls at most; an endpoint failure raises."""
    history: list = []
    for ev in run(client, sample.messages[-1]["content"], tool_task.task_tools(), max_steps=2):
        if isinstance(ev, Final):
            history = ev.history
        elif isinstance(ev, Error):
            if ev.cause != "steps":
                raise RuntimeError(f"L4 sample {sample.messages[-1]['content']!r}: {ev.message}")
            history = ev.history
    turns = [h for h in history if isinstance(h, Turn)]
    return turns[0], turns[1] if len(turns) > 1 else None


def complete_all(client: Client, samples: list[tasks.Sample], concurrency: int | None = None) -> list[Turn]:
    """Each sample's first turn, `concurrency` samples at a time (None: as many as an EngineClient
    batches, 32 for an endpoint): the batches a level's score is computed from."""
    concurrency = concurrency or (client.max_batch if isinstance(client, EngineClient) else 32)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda s: client.complete([s.messages[-1]["content"]], s.tools or []), samples))


def evaluate_level(client: Client, level: int, n: int | None = None, seed: int = 0,
                   concurrency: int | None = None) -> LevelResult:
    """One level's held-out samples through `client` (greedy for a fair score: EngineClient is, an
    endpoint client needs temperature=0), `concurrency` samples at a time (None: as many as an
    EngineClient batches, 32 for an endpoint)."""
    spec = tasks.LEVELS[level]
    concurrency = concurrency or (client.max_batch if isinstance(client, EngineClient) else 32)
    samples = tasks.generate(spec.family, "test", n or spec.n, seed, **spec.params)
    examples = []
    details: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        if spec.metric == "tool_task":
            loops = list(pool.map(lambda s: _tool_loop(client, s), samples))
            first = [t for t, _ in loops]
            formed = [tool_task.well_formed_call(parsed(t), s.tools) for s, t in zip(samples, first)]
            right_call = [tool_task.correct_call(parsed(t), s) for s, t in zip(samples, first)]
            correct = [a is not None and tasks.verify(s, parsed(a)) for s, (_, a) in zip(samples, loops)]
            oks = [c and a for c, a in zip(right_call, correct)]
            score = sum(oks) / len(samples)
            accuracy = sum(correct) / len(samples)
            details = {"well-formed call": sum(formed) / len(samples), "right call": sum(right_call) / len(samples),
                       "right answer": accuracy}
        else:
            first = complete_all(client, samples, concurrency)
            answers = [parsed(t) for t in first]
            oks = [tasks.verify(s, a) for s, a in zip(samples, answers)]
            score = accuracy = sum(oks) / len(samples)
            details = tasks.details(samples, answers)  # e.g. L3: how exact the search steps were
            kinds = sorted({s.meta["kind"] for s in samples if "kind" in s.meta})
            if len(kinds) > 1:  # e.g. L1: copying a sequence and reading a key's value, each on its own
                for kind in kinds:
                    got = [ok for s, ok in zip(samples, oks) if s.meta.get("kind") == kind]
                    details[kind] = sum(got) / len(got)
    for s, t, ok in list(zip(samples, first, oks))[:3]:
        examples.append(dict(prompt=s.messages[-1]["content"][:200], output=_shown(t)[:300], ok=ok))
    return LevelResult(level, spec.family, spec.measures, spec.metric, score, spec.threshold, len(samples),
                       accuracy, examples, details, outcomes=[bool(o) for o in oks], seed=seed)


def capability_report(client: Client, levels: tuple[int, ...] = (1, 2, 3, 4, 5), n: int | None = None,
                      seed: int = 0, concurrency: int | None = None) -> list[LevelResult]:
    return [evaluate_level(client, lv, n, seed, concurrency) for lv in levels]


EVAL_SLOT_TOKENS = 1024  # KV room per slot of the scoring engine: the longest held-out turn (an L3 search,
# an L4 answer after its tools section) is under 1,024 tokens; the pool is shared, so a longer one still runs


def local_client(model: XinzhouLM, tok: Tokenizer, max_batch: int = 200) -> EngineClient:
    """The greedy in-process client the levels are scored with (close it when done). A whole level
    of n = 200 runs as one batch, its prompts prefilled 4,096 tokens a step: on the speedrun's model
    on a CPU that scores L3-L5 about twice as fast as batches of 32 prefilled 512 at a time."""
    page_size = 16
    page, state = cache_sizes(model.config, page_size, next(model.parameters()).dtype)
    return EngineClient(model, tok, max_tokens=EVAL_MAX_TOKENS, max_batch=max_batch, max_tokens_per_step=4096,
                        page_size=page_size, cache_bytes=max_batch * (state + EVAL_SLOT_TOKENS // page_size * page))


def outcome_string(outcomes: list[bool]) -> str:
    """Per-sample outcomes as a string of 1 (pass) and 0 (fail), the form levels.json keeps them in."""
    return "".join("1" if o else "0" for o in outcomes)


def to_json(results: list[LevelResult]) -> list[dict]:
    return [dict(level=x.level, family=x.family, metric=x.metric, score=x.score, threshold=x.threshold,
                 passed=x.passed, ci95=list(x.ci), answer_accuracy=x.answer_accuracy, n=x.n, details=x.details,
                 seed=x.seed, outcomes=outcome_string(x.outcomes))
            for x in results]


def sign_test(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar test of a paired change: if the change were as likely to break a
    problem as to fix one, the probability that the fixed + broken problems whose outcome changed
    split at least this unevenly. 1.0 when no outcome changed."""
    if fixed < 0 or broken < 0:
        raise ValueError(f"sign_test({fixed}, {broken}): counts must be >= 0")
    m = fixed + broken
    tail = sum(math.comb(m, i) for i in range(min(fixed, broken) + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def paired_change(before: str | list[bool], after: str | list[bool]) -> tuple[int, int, float]:
    """(fixed, broken, p) between two runs over the same samples in the same order: samples that
    failed before and pass now, the reverse, and sign_test's p of that split."""
    a = [o in (True, "1") for o in before]
    b = [o in (True, "1") for o in after]
    if len(a) != len(b):
        raise ValueError(f"paired_change: {len(a)} outcomes before, {len(b)} now; not the same samples")
    fixed = sum(not x and y for x, y in zip(a, b))
    broken = sum(x and not y for x, y in zip(a, b))
    return fixed, broken, sign_test(fixed, broken)


def compare_markdown(results: list[LevelResult], previous: list[dict]) -> str:
    """The change per level against an earlier levels.json. Where both scored the same held-out
    problems (same n and seed, and the earlier file has its outcomes), the change is also paired:
    problems fixed and broken, and the exact McNemar p of that split (sign_test)."""
    before = {int(p["level"]): p for p in previous}
    lines = ["| level | before | now | change | paired: fixed / broken (p) | has it (before -> now) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        p = before.get(r.level)
        if p is None:
            lines.append(f"| L{r.level} | - | {r.score:.1%} | new | - | - -> {'yes' if r.passed else 'no'} |")
            continue
        delta = r.score - float(p["score"])
        if not isinstance(p.get("outcomes"), str) or not r.outcomes:
            paired = "-"  # (a levels.json from before outcomes were kept)
        elif p.get("n") == r.n and p.get("seed") == r.seed and len(p["outcomes"]) == len(r.outcomes):
            fixed, broken, pv = paired_change(p["outcomes"], r.outcomes)
            paired = f"{fixed} / {broken} (p = {pv:.2g})"
        else:
            paired = "other problems"
        lines.append(f"| L{r.level} | {float(p['score']):.1%} | {r.score:.1%} | {delta:+.1%} | {paired} | "
                     f"{'yes' if p['passed'] else 'no'} -> {'yes' if r.passed else 'no'} |")
    return "\n".join(lines) + "\n"


def report_markdown(results: list[LevelResult]) -> str:
    lines = ["| level | task | measures | metric | score (95% CI) | threshold | has it | n | details |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lo, hi = r.ci
        details = ", ".join(f"{k} {v:.1%}" for k, v in r.details.items())
        lines.append(f"| L{r.level} | {r.family} | {r.measures} | {r.metric} | {r.score:.1%} ({lo:.1%}-{hi:.1%}) | "
                     f"{r.threshold:.0%} | {'yes' if r.passed else 'no'} | {r.n} | {details} |")
    reached = [f"L{r.level}" for r in results if r.passed]
    missed = [f"L{r.level}" for r in results if not r.passed]
    lines += ["", f"Reached: {', '.join(reached) or 'none'}. Not reached: {', '.join(missed) or 'none'}.", ""]
    for r in results:
        for ex in r.examples[:2]:
            out = ex["output"].replace("\n", "\\n")
            prompt = ex["prompt"].replace("\n", " ")
            lines.append(f"- L{r.level} {'ok' if ex['ok'] else 'wrong'}: `{prompt[:80]}` -> `{out[:160]}`")
    return "\n".join(lines) + "\n"


def plot_levels(results: list[LevelResult], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [f"L{r.level} {r.family}" for r in results]
    lo = [r.score - r.ci[0] for r in results]
    hi = [r.ci[1] - r.score for r in results]
    ax.bar(names, [r.score for r in results], color=["tab:green" if r.passed else "tab:gray" for r in results],
           yerr=[lo, hi], capsize=4, ecolor="black")
    ax.scatter(names, [r.threshold for r in results], marker="_", s=400, color="black", label="threshold")
    ax.set(ylim=(0, 1.05), ylabel="held-out score", title="capability levels")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
