"""Generation: the one loop (evals, RL rollouts, server and CLI use it).

    outs = generate(model, [prompt_ids, ...], SamplingConfig(max_new_tokens=32, stop_ids=(eos,)))
    outs[0].ids, outs[0].finish_reason, outs[0].logprobs

`stream(...)` yields `TokenEvent`s as tokens are produced; `generate` collects them. Both are thin
wrappers over `Engine` (scheduler.py: continuous batching, chunked prefill, prefix reuse), with
every prompt admitted at once. With a seed, prompt i samples with seed + i (so copies of one prompt
draw different samples, each reproducible whatever else is in the batch).

Modules: sampling.py (parameters, checks, transforms), scheduler.py (Engine and its events),
prefix.py (snapshot LRU), graphs.py (fixed-shape decode steps, CUDA graphs), logprobs.py
(`token_logprobs`, the one definition of a log-probability).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

from xinzhou.cache import cache_sizes
from xinzhou.engine.logprobs import logprobs_of, token_logprobs
from xinzhou.engine.sampling import (SamplingConfig, SamplingParams, check_prompts, sample_token,
                                     transform_logits)
from xinzhou.engine.scheduler import Engine, Event, Finished, TextDelta, Token, Usage
from xinzhou.model import XinzhouLM

__all__ = [
    "Completion", "Engine", "Event", "Finished", "SamplingConfig", "SamplingParams", "TextDelta", "Token",
    "TokenEvent", "Usage", "generate", "logprobs_of", "sample_token", "stream", "token_logprobs",
    "transform_logits",
]

PAGE_SIZE = 16
MAX_TOKENS_PER_STEP = 8192  # prompts up to this many tokens in all prefill in one forward


@dataclass
class Completion:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each token: token_logprobs' definition
    finish_reason: str = "length"  # "stop" when a stop id ended it


@dataclass(frozen=True)
class TokenEvent:
    index: int  # which prompt
    token: int
    logprob: float
    finish_reason: str | None  # set on a sequence's last token


def _engine_for(model: XinzhouLM, prompts: list[list[int]], cfg: SamplingParams) -> Engine:
    """An engine with a slot and pages for every prompt at once (no prefix reuse: one batch)."""
    page_bytes, state_bytes = cache_sizes(model.config, PAGE_SIZE, next(model.parameters()).dtype)
    pages = sum(-(-(len(p) + cfg.max_new_tokens) // PAGE_SIZE) for p in prompts)
    return Engine(model, max_batch=len(prompts), max_tokens_per_step=MAX_TOKENS_PER_STEP, page_size=PAGE_SIZE,
                  cache_bytes=len(prompts) * state_bytes + pages * page_bytes, prefix_reuse=False)


def stream(model: XinzhouLM, prompts: list[list[int]], cfg: SamplingConfig) -> Iterator[TokenEvent]:
    """Checks the arguments now (not at the first next()), then yields tokens as they come; a
    sequence's last token carries its finish reason."""
    if not isinstance(cfg, SamplingParams):
        raise ValueError(f"cfg: expected a SamplingConfig, got {type(cfg).__name__}")
    prompts = check_prompts(prompts, model.config, cfg.max_new_tokens)
    engine = _engine_for(model, prompts, cfg)
    index = {}
    for i, p in enumerate(prompts):
        seed = None if cfg.seed is None else cfg.seed + i
        index[engine.add_request(p, dataclasses.replace(cfg, seed=seed, logprobs=True))] = i
    return _events(engine, index)


def _events(engine: Engine, index: dict[int, int]) -> Iterator[TokenEvent]:
    while engine.has_work():
        events = engine.step()
        reasons = {e.request_id: e.reason for e in events if isinstance(e, Finished)}
        tokens = [e for e in events if isinstance(e, Token)]
        last = {e.request_id: e for e in tokens}
        for e in tokens:
            reason = reasons.get(e.request_id) if last[e.request_id] is e else None
            yield TokenEvent(index[e.request_id], e.token_id, e.logprob, reason)


def generate(model: XinzhouLM, prompts: list[list[int]], cfg: SamplingConfig) -> list[Completion]:
    outs = [Completion() for _ in prompts]
    for ev in stream(model, prompts, cfg):
        outs[ev.index].ids.append(ev.token)
        outs[ev.index].logprobs.append(ev.logprob)
        if ev.finish_reason is not None:
            outs[ev.index].finish_reason = ev.finish_reason
    return outs
