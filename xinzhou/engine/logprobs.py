"""The one definition of a token's log-probability, shared by the engine and the RL trainer.

    lp = token_logprobs(model, ids)             # [len(ids) - 1]: log p(ids[t] | ids[:t]), t >= 1
    lp = token_logprobs(model, ids, start=n)    # only the tokens after a prompt of n tokens

log p is the raw log-softmax of the model's fp32 logits (the LM head in fp32 when the config asks
for `lm_head_fp32`, as model.forward applies it), before any sampling transform: no temperature,
top-k or top-p. A sampled token's reported log-probability is therefore that of the model, not of
the distribution it was drawn from (the two agree for greedy decoding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xinzhou.model import XinzhouLM


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [..., V], tokens [...] -> log p(token) [...] in fp32."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None].long())[..., 0]


@torch.no_grad()
def token_logprobs(model: XinzhouLM, ids: Sequence[int] | torch.Tensor, start: int = 1) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t in [start, len(ids)), from one full forward: [len(ids) - start] fp32."""
    x = torch.as_tensor(ids, dtype=torch.long, device=next(model.parameters()).device).reshape(1, -1)  # [1, T]
    if not 1 <= start < x.shape[1]:
        raise ValueError(f"start = {start}: must be in [1, len(ids) = {x.shape[1]}) (the first token has no "
                         f"log-probability: nothing precedes it)")
    was_training = model.training
    model.eval()
    try:
        logits = model(x)[0, start - 1:-1]  # [T - start, V]: position t - 1 predicts token t
    finally:
        model.train(was_training)
    return logprobs_of(logits, x[0, start:])
