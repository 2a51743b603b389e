"""Capability levels: run the held-out task sets through the engine and score them with the
tasks' verifiers.

    results = capability_report(model, tokenizer, levels=(1, 2, 3, 4, 5), n=200)
    print(report_markdown(results))

Each level has a metric and a threshold (xinzhou.tasks.LEVELS): a checkpoint "has" a level when
its score on held-out samples reaches the threshold. Scores come with a 95% Wilson interval and
their n. L4 runs the real tool loop: every well-formed call of the first assistant turn is
executed, its result appended, and the model answers; a sample passes only with the right tool
and the right arguments (exactly one call) and then the right final answer. Well-formed calls,
right calls and right answers are reported beside the score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from xinzhou import tasks
from xinzhou.chat_format import ParsedMessage, parse_ids, render
from xinzhou.engine import SamplingConfig, generate
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
    return max(0.0, centre - half), min(1.0, centre + half)


def _complete(model: XinzhouLM, tok: Tokenizer, convs: list[tuple[list[dict], list | None]],
              max_new_tokens: int, batch_size: int) -> list[tuple[ParsedMessage, str]]:
    """One assistant turn for each (messages, tools), greedy, up to the end-of-turn token."""
    eos = tok.eos_id
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, stop_ids=(eos,))
    out = []
    for i in range(0, len(convs), batch_size):
        chunk = convs[i:i + batch_size]
        prompts = [render(m, tok, tools=t, add_generation_prompt=True).ids for m, t in chunk]
        for (m, t), c in zip(chunk, generate(model, prompts, cfg)):
            ids = c.ids[:-1] if c.ids and c.ids[-1] == eos else c.ids
            out.append((parse_ids(ids, tok, tools=t), tok.decode(ids)))
    return out


def evaluate_level(model: XinzhouLM, tok: Tokenizer, level: int, n: int | None = None, seed: int = 0,
                   batch_size: int = 32, max_new_tokens: int = 96) -> LevelResult:
    spec = tasks.LEVELS[level]
    samples = tasks.generate(spec.family, "test", n or spec.n, seed, **spec.params)
    first = _complete(model, tok, [(s.messages, s.tools) for s in samples], max_new_tokens, batch_size)
    examples = []
    details: dict[str, float] = {}
    if spec.metric == "tool_task":
        formed = [tool_task.well_formed_call(p, s.tools) for s, (p, _) in zip(samples, first)]
        right_call = [tool_task.correct_call(p, s) for s, (p, _) in zip(samples, first)]
        # the real loop: execute each well-formed call, hand back the results, let the model answer
        follow, idx = [], []
        for i, (s, (p, _)) in enumerate(zip(samples, first)):
            if formed[i]:
                results = [{"role": "tool", "tool_call_id": c["id"],
                            "content": tool_task.execute(c["function"]["name"], c["function"]["arguments"], s.tools)}
                           for c in p.tool_calls]
                follow.append((s.messages + [p.to_message(), *results], s.tools))
                idx.append(i)
        answers = _complete(model, tok, follow, max_new_tokens, batch_size) if follow else []
        correct = [False] * len(samples)
        for i, (p, _) in zip(idx, answers):
            correct[i] = tasks.verify(samples[i], p)
        oks = [c and a for c, a in zip(right_call, correct)]
        score = sum(oks) / len(samples)
        accuracy = sum(correct) / len(samples)
        details = {"well-formed call": sum(formed) / len(samples), "right call": sum(right_call) / len(samples),
                   "right answer": accuracy}
    else:
        oks = [tasks.verify(s, p) for s, (p, _) in zip(samples, first)]
        score = accuracy = sum(oks) / len(samples)
    for s, (_, text), ok in list(zip(samples, first, oks))[:3]:
        examples.append(dict(prompt=s.messages[-1]["content"][:200], output=text[:300], ok=ok))
    return LevelResult(level, spec.family, spec.measures, spec.metric, score, spec.threshold, len(samples),
                       accuracy, examples, details)


def capability_report(model: XinzhouLM, tok: Tokenizer, levels: tuple[int, ...] = (1, 2, 3, 4, 5),
                      n: int | None = None, seed: int = 0, batch_size: int = 32) -> list[LevelResult]:
    return [evaluate_level(model, tok, lv, n, seed, batch_size) for lv in levels]


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
