"""Batched generation: prefill a left-padded batch, then decode one token per step with the
HybridCache. The only generation loop in xinzhou (evals, RL rollouts, server and CLI use it).

    outs = generate(model, [prompt_ids, ...], SamplingConfig(max_new_tokens=32, stop_ids=(eos,)))
    outs[0].ids, outs[0].finish_reason, outs[0].logprobs

`stream(...)` yields `TokenEvent`s as tokens are produced; `generate` collects them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from xinzhou.cache import HybridCache
from xinzhou.model import XinzhouLM


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_ids: tuple[int, ...] = ()  # generation of a sequence ends after one of these (included)
    seed: int | None = None


@dataclass
class Completion:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each sampled token, under the sampling distribution's logits
    finish_reason: str = "length"  # "stop" when a stop id ended it


@dataclass(frozen=True)
class TokenEvent:
    index: int  # which prompt
    token: int
    logprob: float
    finish_reason: str | None  # set on a sequence's last token


def sample_next(logits: torch.Tensor, cfg: SamplingConfig,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (token ids [B], their log-probabilities [B] under the distribution
    actually sampled from: temperature, top-k and top-p applied; the plain log-softmax for greedy)."""
    if cfg.temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    logp = torch.log_softmax(logits, -1)
    tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


@torch.no_grad()
def stream(model: XinzhouLM, prompts: list[list[int]], cfg: SamplingConfig) -> Iterator[TokenEvent]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[i, T - len(p):] = torch.tensor(p, device=device)
        mask[i, T - len(p):] = 1
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    cache = HybridCache(model.config, B, capacity=T + cfg.max_new_tokens, device=device,
                        dtype=next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    try:
        logits = model(ids, attention_mask=mask, cache=cache, last_logits_only=True)[:, -1]
        alive = [True] * B
        stop = set(cfg.stop_ids)
        for step in range(cfg.max_new_tokens):
            tok, lp = sample_next(logits, cfg, generator)
            last = step == cfg.max_new_tokens - 1
            for i, (t, l) in enumerate(zip(tok.tolist(), lp.tolist())):  # one host sync per step
                if not alive[i]:
                    continue
                reason = "stop" if t in stop else ("length" if last else None)
                alive[i] = t not in stop
                yield TokenEvent(i, t, l, reason)
            if last or not any(alive):
                break
            # finished sequences keep decoding as padding (their state is left untouched); while
            # all are alive no mask is needed, which keeps the fused decode kernels in use
            step_mask = None if all(alive) else torch.tensor(alive, device=device)[:, None].long()
            logits = model(tok[:, None], attention_mask=step_mask, cache=cache, last_logits_only=True)[:, -1]
    finally:
        model.train(was_training)


def generate(model: XinzhouLM, prompts: list[list[int]], cfg: SamplingConfig) -> list[Completion]:
    outs = [Completion() for _ in prompts]
    for ev in stream(model, prompts, cfg):
        outs[ev.index].ids.append(ev.token)
        outs[ev.index].logprobs.append(ev.logprob)
        if ev.finish_reason is not None:
            outs[ev.index].finish_reason = ev.finish_reason
    return outs
