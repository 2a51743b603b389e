"""Sampling parameters, their validation, the prompt checks, and the sampling transforms.

    params = SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9, seed=1, stop_ids=(eos,))
    prompts = check_prompts([[1, 2, 3]], model.config, params.max_new_tokens)
    tok = sample_token(logits_row, params, generator)

Every check raises a ValueError that names the field (or the prompt index and position) and
what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from xinzhou.config import ModelConfig


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request is sampled and when it ends.

    temperature 0 is greedy (top_p / top_k are then irrelevant). A request ends after a stop id
    (included in its tokens), when its detokenized text contains a stop string (needs a tokenizer;
    the stop string is not part of the emitted text), or after max_new_tokens. seed gives the
    request its own generator, so its samples do not depend on what else is in the batch.
    logprobs: report each sampled token's log-probability (see `token_logprobs` for the definition).
    """
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens!r}: must be an int >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or math.isinf(t):
            raise ValueError(f"temperature = {t!r}: must be a finite number >= 0 (0 = greedy)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p <= 1:
            raise ValueError(f"top_p = {p!r}: must be in (0, 1] (1 = off)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k!r}: must be an int >= 0 (0 = off)")
        if _is_int(self.stop_ids):
            raise ValueError(f"stop_ids = {self.stop_ids!r}: must be a tuple of ints, not one int "
                             f"(write stop_ids=({self.stop_ids},) with the comma)")
        if not isinstance(self.stop_ids, (tuple, list)) or not all(_is_int(i) and i >= 0 for i in self.stop_ids):
            raise ValueError(f"stop_ids = {self.stop_ids!r}: must be a tuple of token ids (ints >= 0)")
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        if isinstance(self.stop_strings, str):
            raise ValueError(f"stop_strings = {self.stop_strings!r}: must be a tuple of strings, not one "
                             f"string (write stop_strings=({self.stop_strings!r},))")
        if (not isinstance(self.stop_strings, (tuple, list))
                or not all(isinstance(s, str) and s for s in self.stop_strings)):
            raise ValueError(f"stop_strings = {self.stop_strings!r}: must be a tuple of non-empty strings")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed = {self.seed!r}: must be an int or None")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs = {self.logprobs!r}: must be True or False")


# Constrains one request's next token: given its output so far, (a token id to force or None,
# token ids banned from the sample). Log-probs are still those of the raw distribution.
Guide = Callable[[Sequence[int]], tuple[int | None, Sequence[int]]]


# The batch-level name `generate` and `stream` have always taken; one class, so the checks are one.
SamplingConfig = SamplingParams


def check_prompt(prompt: object, config: ModelConfig, max_new_tokens: int, index: int = 0) -> list[int]:
    """The prompt as a list of ints, or a ValueError naming prompt `index` and what is wrong: not a
    sequence of ints, empty, an id outside [0, vocab_size), or too long for the model's positions
    (prompt + max_new_tokens must fit in max_position_embeddings: refused, not capped)."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1:
            raise ValueError(f"prompt {index}: a token tensor must be 1-D, got shape {list(prompt.shape)}")
        prompt = prompt.tolist()
    if _is_int(prompt):
        raise ValueError(f"prompt {index} is the int {prompt}: prompts must be a list of token-id lists "
                         f"(a single prompt is [ids], not ids)")
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt {index}: expected a list of token ids, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise ValueError(f"prompt {index} is empty: every prompt needs at least one token")
    V = config.vocab_size
    for pos, t in enumerate(prompt):
        if not _is_int(t):
            raise ValueError(f"prompt {index}, position {pos}: token {t!r} is not an int")
        if not 0 <= t < V:
            raise ValueError(f"prompt {index}, position {pos}: token id {t} is outside [0, vocab_size = {V})")
    limit = config.max_position_embeddings
    if len(prompt) > limit:
        raise ValueError(f"prompt {index} has {len(prompt)} tokens: more than max_position_embeddings = {limit}")
    if len(prompt) + max_new_tokens > limit:
        raise ValueError(f"prompt {index}: {len(prompt)} tokens + max_new_tokens = {max_new_tokens} exceeds "
                         f"max_position_embeddings = {limit}; lower max_new_tokens to at most "
                         f"{limit - len(prompt)}")
    return list(prompt)


def check_prompts(prompts: object, config: ModelConfig, max_new_tokens: int) -> list[list[int]]:
    """A batch of prompts (a list of token-id lists), each checked by `check_prompt`."""
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts: expected a list of token-id lists, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    if all(_is_int(p) for p in prompts):
        raise ValueError(f"prompts is a flat list of {len(prompts)} ints: pass a list of prompts, "
                         f"e.g. [ids] for one prompt")
    return [check_prompt(p, config, max_new_tokens, i) for i, p in enumerate(prompts)]


def transform_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] fp32 -> the logits actually sampled from: temperature, then top-k, then top-p
    (the smallest set of most likely tokens whose probability reaches top_p)."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits [V] fp32: argmax when greedy, else a draw from the transformed
    distribution with this request's generator."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(transform_logits(logits, params), -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def validate_stops(params: SamplingParams, config: ModelConfig, has_tokenizer: bool) -> None:
    """Stop ids must be in the vocabulary; stop strings need a tokenizer to be matched."""
    for i in params.stop_ids:
        if i >= config.vocab_size:
            raise ValueError(f"stop_ids: {i} is outside [0, vocab_size = {config.vocab_size})")
    if params.stop_strings and not has_tokenizer:
        raise ValueError(f"stop_strings = {params.stop_strings!r} need a tokenizer: pass tokenizer= to the Engine")
