"""Policy-gradient losses for RL on verifiable rewards: CISPO (MiniMax-M1), GRPO and DAPO.

Pure functions on [N, T] tensors (N responses, T response positions):
    logp       log-probabilities of the sampled tokens under the policy being trained (with grad)
    old_logp   the same tokens under the policy that sampled them (the rollout's own log-probs)
    advantages per token, [N, T] or [N] (one value for every token of a response)
    mask       1 on response tokens that count; 0 on padding and on truncated or masked tokens

Each loss returns `(loss, stats)`, the loss already normalised and to be minimised. Token-level
losses divide by `num_tokens`: the number of counted response tokens in the whole optimiser step
(every gradient-accumulation micro-batch, every rank). Pass it when a step is split, so that the
summed gradients equal those of the unsplit batch; it defaults to mask.sum() of the call. Tokens
with mask 0 are in neither the numerator nor the denominator.

    adv, info = group_advantages(rewards, group_size=8)           # [N] -> [N]
    loss, stats = cispo_loss(logp, old_logp, adv, mask)            # M1 Eq. 4-5
    loss, stats = dapo_loss(logp, old_logp, adv, mask)             # PPO-clip, clip-higher, token mean
    loss, stats = grpo_loss(logp, old_logp, adv, mask)             # PPO-clip, per-response mean

Clip parameters are offsets from 1 everywhere in this module: `eps_high=0.28` means a ratio is
clipped at 1.28, and `eps_high=4.0` caps CISPO's weight at 5.0 (the absolute cap ScaleRL and TRL
quote as 5). None means no bound on that side.

With one optimiser step per rollout batch the ratio is 1 everywhere and CISPO, DAPO and PPO give
the same gradient; they differ only when several minibatch updates reuse a rollout batch, with the
ratio taken against the sampler's log-probs (tests/test_rl.py asserts both facts).
"""

from __future__ import annotations

from typing import Literal

import torch


def _broadcast(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == 1:
        if advantages.shape[0] != like.shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} entries for {like.shape[0]} responses")
        return advantages[:, None].expand_as(like)
    if advantages.shape != like.shape:
        raise ValueError(f"advantages shape {list(advantages.shape)} does not match logp {list(like.shape)}")
    return advantages


def _check(logp: torch.Tensor, old_logp: torch.Tensor,
           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mask as floats, and logp / old_logp set to 0 where it is 0: padding may hold anything
    (even -inf), and inf * 0 would turn the sums into nan."""
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp {list(logp.shape)}, old_logp {list(old_logp.shape)} and mask {list(mask.shape)} "
                         "must be the same [N, T] shape")
    on = mask != 0
    return mask.to(logp.dtype), torch.where(on, logp, 0.0), torch.where(on, old_logp, 0.0)


def _denominator(mask: torch.Tensor, num_tokens: float | int | torch.Tensor | None) -> torch.Tensor:
    n = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype, device=mask.device)
    return n.clamp(min=1.0)  # a batch without tokens gives a zero loss, not nan


def _bounds(eps_low: float | None, eps_high: float | None) -> tuple[float | None, float | None]:
    for name, e in (("eps_low", eps_low), ("eps_high", eps_high)):
        if e is not None and not e >= 0:
            raise ValueError(f"{name} = {e}: an offset from 1, must be >= 0 (or None for no bound)")
    return (None if eps_low is None else 1.0 - eps_low), (None if eps_high is None else 1.0 + eps_high)


def cispo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
               eps_low: float | None = None, eps_high: float | None = 4.0, token_mask_eq7: bool = False,
               trust_low: float = 0.2, trust_high: float = 0.28,
               num_tokens: float | int | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """CISPO (MiniMax-M1 Eq. 4-5): -1/num_tokens * sum sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp.

    The clipped importance ratio is only a weight (stop-gradient), so every token keeps a gradient;
    the weight is at most 1 + eps_high (offset; the default 4.0 caps it at 5.0) and at least
    1 - eps_low (None: no lower bound, as M1 uses it). With token_mask_eq7 the unified form (Eq. 6-7)
    multiplies each token by M = 0 where A > 0 and r > 1 + trust_high or A < 0 and r < 1 - trust_low
    (PPO's trust region, offsets too); with eps_low = eps_high = None its gradient is PPO-clip's.
    stats: clip_fraction (weights that were clipped), masked_fraction (Eq. 7 zeros), ratio_mean,
    ratio_max, num_tokens."""
    m, logp, old_logp = _check(logp, old_logp, mask)
    adv = _broadcast(advantages, logp).to(logp.dtype)
    lo, hi = _bounds(eps_low, eps_high)
    ratio = torch.exp(logp.detach() - old_logp)
    weight = ratio if lo is None and hi is None else ratio.clamp(min=lo, max=hi)
    keep = m
    masked = torch.zeros_like(m)
    if token_mask_eq7:
        t_lo, t_hi = _bounds(trust_low, trust_high)
        drop = ((adv > 0) & (ratio > t_hi)) | ((adv < 0) & (ratio < t_lo))
        masked = drop.to(m.dtype) * m
        keep = m * (~drop).to(m.dtype)
    n = _denominator(m, num_tokens)
    loss = -(weight * adv * logp * keep).sum() / n
    counted = m.sum().clamp(min=1.0)
    clipped = (weight != ratio).to(m.dtype) * m
    stats = dict(clip_fraction=(clipped.sum() / counted).item(), masked_fraction=(masked.sum() / counted).item(),
                 ratio_mean=((ratio * m).sum() / counted).item(),
                 ratio_max=(ratio.masked_fill(m == 0, 0).max().item() if m.any() else 0.0), num_tokens=float(n))
    return loss, stats


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  eps_low: float = 0.2, eps_high: float = 0.2,
                  aggregation: Literal["token", "sequence"] = "token",
                  num_tokens: float | int | torch.Tensor | None = None,
                  num_sequences: float | int | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO-clip: -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) per token (offsets from 1).
    aggregation "token": summed over the step's tokens / num_tokens (DAPO); "sequence": each
    response's mean over its own tokens, summed / num_sequences (GRPO: long responses weigh less
    per token). A token outside the trust region on the side its advantage pushes gets no gradient.
    stats: clip_fraction (tokens whose clipped term was taken), ratio_mean, num_tokens."""
    m, logp, old_logp = _check(logp, old_logp, mask)
    adv = _broadcast(advantages, logp).to(logp.dtype)
    lo, hi = _bounds(eps_low, eps_high)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(min=lo, max=hi) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if aggregation == "token":
        n = _denominator(m, num_tokens)
        loss = (per_token * m).sum() / n
    elif aggregation == "sequence":
        lengths = m.sum(1)
        per_seq = (per_token * m).sum(1) / lengths.clamp(min=1.0)
        has = (lengths > 0).to(m.dtype)
        n = _denominator(has, num_sequences)
        loss = (per_seq * has).sum() / n
    else:
        raise ValueError(f"aggregation = {aggregation!r}: expected 'token' or 'sequence'")
    counted = m.sum().clamp(min=1.0)
    took_clip = (clipped < unclipped).to(m.dtype) * m
    stats = dict(clip_fraction=(took_clip.sum() / counted).item(),
                 ratio_mean=((ratio.detach() * m).sum() / counted).item(), num_tokens=float(m.sum()))
    return loss, stats


def dapo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              eps_low: float = 0.2, eps_high: float = 0.28,
              num_tokens: float | int | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """DAPO's policy loss: PPO-clip with clip-higher (ratio in [0.8, 1.28]: offsets 0.2 / 0.28) and
    a token-level mean over the whole step. Dynamic sampling (dropping groups whose rewards agree)
    is the caller's, with group_advantages' `zero_variance` mask."""
    return ppo_clip_loss(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                         aggregation="token", num_tokens=num_tokens)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              eps: float = 0.2, num_sequences: float | int | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO's policy loss (DeepSeekMath, without the KL term): PPO-clip with ratio in [0.8, 1.2]
    (offset eps both sides), each response's token mean, then the mean over responses."""
    return ppo_clip_loss(logp, old_logp, advantages, mask, eps_low=eps, eps_high=eps,
                         aggregation="sequence", num_sequences=num_sequences)


def group_advantages(rewards: torch.Tensor, group_size: int, *,
                     scale: Literal["group", "batch"] | None = "group",
                     eps: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """rewards [N] (N = groups x group_size, each group's responses adjacent) -> advantages [N]:
    the reward minus its group's mean, divided by the group's standard deviation ("group", GRPO),
    by the standard deviation of all the batch's centred rewards ("batch", ScaleRL), or not at
    all (None). Standard deviations are the unbiased estimate (as TRL and DeepSeekMath); eps
    keeps a group whose rewards agree at advantage 0. stats: zero_variance (a bool [N // group_size]
    mask of groups whose rewards all agree: they carry no signal; drop them for dynamic
    sampling), zero_variance_groups (their count), reward_mean, reward_std."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat [N] tensor, got shape {list(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size = {group_size} (>= 2)")
    r = rewards.float().view(-1, group_size)  # [groups, G]
    centred = r - r.mean(1, keepdim=True)
    zero_var = (r.max(1).values - r.min(1).values) == 0
    if scale == "group":
        adv = centred / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = centred / (centred.std() + eps)
    elif scale is None:
        adv = centred
    else:
        raise ValueError(f"scale = {scale!r}: expected 'group', 'batch' or None")
    stats = dict(zero_variance=zero_var, zero_variance_groups=int(zero_var.sum()),
                 reward_mean=float(r.mean()), reward_std=float(r.std()) if r.numel() > 1 else 0.0)
    return adv.view(-1), stats
