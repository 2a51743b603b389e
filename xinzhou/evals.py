"""Capability levels: run the held-out task sets through the engine and score them with the
tasks' verifiers.

    results = capability_report(model, tokenizer, levels=(1, 2, 3, 4, 5), n=200)
    print(report_markdown(results))

Each level has a metric and a threshold (xinzhou.tasks.LEVELS): a checkpoint "has" a level when
its score on held-out samples reaches the threshold. L4 runs the real tool loop: the first
assistant turn must be a well-formed call to an offered tool (the level's metric); the call is
executed, its result appended, and the final answer is scored too.
"""

from __future__ import annotations

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

    @property
    def passed(self) -> bool:
        return self.score >= self.threshold


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
    if spec.metric == "well_formed_call":
        formed = [tool_task.well_formed_call(p, s.tools) for s, (p, _) in zip(samples, first)]
        # the real loop: execute each well-formed call, hand back the result, let the model answer
        follow, idx = [], []
        for i, (s, (p, _)) in enumerate(zip(samples, first)):
            if formed[i]:
                call = p.tool_calls[0]
                result = tool_task.execute(call["function"]["name"], call["function"]["arguments"], s.tools)
                msgs = s.messages + [p.to_message(), {"role": "tool", "tool_call_id": call["id"], "content": result}]
                follow.append((msgs, s.tools))
                idx.append(i)
        answers = _complete(model, tok, follow, max_new_tokens, batch_size) if follow else []
        correct = [False] * len(samples)
        for i, (p, _) in zip(idx, answers):
            correct[i] = tasks.verify(samples[i], p)
        score = sum(formed) / len(samples)
        accuracy = sum(correct) / len(samples)
        oks = formed
    else:
        oks = [tasks.verify(s, p) for s, (p, _) in zip(samples, first)]
        score = accuracy = sum(oks) / len(samples)
    for s, (_, text), ok in list(zip(samples, first, oks))[:3]:
        examples.append(dict(prompt=s.messages[-1]["content"][:200], output=text[:300], ok=ok))
    return LevelResult(level, spec.family, spec.measures, spec.metric, score, spec.threshold, len(samples),
                       accuracy, examples)


def capability_report(model: XinzhouLM, tok: Tokenizer, levels: tuple[int, ...] = (1, 2, 3, 4, 5),
                      n: int | None = None, seed: int = 0, batch_size: int = 32) -> list[LevelResult]:
    return [evaluate_level(model, tok, lv, n, seed, batch_size) for lv in levels]


def report_markdown(results: list[LevelResult]) -> str:
    lines = ["| level | task | measures | metric | score | threshold | has it | answer accuracy | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| L{r.level} | {r.family} | {r.measures} | {r.metric} | {r.score:.1%} | {r.threshold:.0%} | "
                     f"{'yes' if r.passed else 'no'} | {r.answer_accuracy:.1%} | {r.n} |")
    lines.append("")
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
    ax.bar(names, [r.score for r in results], color=["tab:green" if r.passed else "tab:gray" for r in results])
    ax.scatter(names, [r.threshold for r in results], marker="_", s=400, color="black", label="threshold")
    ax.set(ylim=(0, 1.05), ylabel="held-out score", title="capability levels")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
