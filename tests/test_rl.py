"""RL losses against hand-derived values: CISPO keeps every token's gradient and caps its weight,
equals PPO-clip with the Eq. 7 mask, coincides with DAPO and PPO at ratio 1; token-level
normalisation is invariant to how a step is split (micro-batches and 2 gloo ranks); masked tokens
are in neither the numerator nor the denominator."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xinzhou.rl import cispo_loss, dapo_loss, group_advantages, grpo_loss, ppo_clip_loss


def grad_of(loss_fn, logp, *args, **kw):
    x = logp.clone().requires_grad_(True)
    loss, stats = loss_fn(x, *args, **kw)
    loss.backward()
    return x.grad, loss.detach(), stats


def test_cispo_keeps_every_gradient_and_caps_the_weight():
    ratio = torch.tensor([[0.5, 1.0, 2.0, 10.0]])
    old = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05]]))
    logp = old + torch.log(ratio)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones(1, 4)
    g, loss, stats = grad_of(cispo_loss, logp, old, adv, mask)  # eps_high 4.0: the weight is at most 5
    # d loss / d logp_t = -w_t * A_t / 4 with w = clip(r, max=5) = [0.5, 1, 2, 5]
    assert torch.allclose(g, -torch.tensor([[0.5, -1.0, 2.0, 5.0]]) / 4)
    assert loss.item() == pytest.approx(-(0.5 * logp[0, 0] - logp[0, 1] + 2 * logp[0, 2] + 5 * logp[0, 3]).item() / 4)
    assert stats["clip_fraction"] == pytest.approx(0.25) and stats["ratio_max"] == pytest.approx(10.0)
    # PPO-clip (0.2 / 0.28) zeroes the gradient of the two tokens outside its trust region with A > 0
    g_ppo, _, _ = grad_of(dapo_loss, logp, old, adv, mask)
    assert g_ppo[0, 2] == 0 and g_ppo[0, 3] == 0 and (g != 0).all()
    # a lower bound, when asked for, is 1 - eps_low
    g_low, _, _ = grad_of(cispo_loss, logp, old, adv, mask, eps_low=0.2, eps_high=0.5)
    assert torch.allclose(g_low, -torch.tensor([[0.8, -1.0, 1.5, 1.5]]) / 4)


def _random_batch(seed, n=6, t=9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=g) * 3 - 0.1
    logp = old + torch.randn(n, t, generator=g) * 0.6  # ratios well outside [0.8, 1.28] on both sides
    adv = torch.randn(n, generator=g)
    mask = (torch.rand(n, t, generator=g) > 0.25).float()
    return logp, old, adv, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cispo_with_the_eq7_mask_is_the_ppo_clip_gradient(seed):
    logp, old, adv, mask = _random_batch(seed)
    g_cispo, _, stats = grad_of(cispo_loss, logp, old, adv, mask, eps_low=None, eps_high=None,
                                token_mask_eq7=True, trust_low=0.2, trust_high=0.28)
    g_ppo, _, _ = grad_of(ppo_clip_loss, logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert stats["masked_fraction"] > 0.1  # the trust region actually cut tokens here
    assert torch.allclose(g_cispo, g_ppo, atol=1e-6)


def test_at_ratio_one_cispo_dapo_and_ppo_coincide():
    _, old, adv, mask = _random_batch(3)
    logp = old.clone()  # one update per rollout batch: the policy that trains is the one that sampled
    grads = [grad_of(f, logp, old, adv, mask)[0] for f in (cispo_loss, dapo_loss, ppo_clip_loss)]
    assert torch.allclose(grads[0], grads[1], atol=1e-7) and torch.allclose(grads[0], grads[2], atol=1e-7)
    # and the common value is -A / num_tokens on every counted token
    expected = -adv[:, None].expand_as(mask) * mask / mask.sum()
    assert torch.allclose(grads[0], expected, atol=1e-7)


def test_grpo_averages_per_response_then_over_responses():
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])  # lengths 1 and 3
    g, _, _ = grad_of(grpo_loss, old.clone(), old, torch.tensor([1.0, 1.0]), mask)
    assert torch.allclose(g, torch.tensor([[-0.5, 0, 0], [-1 / 6, -1 / 6, -1 / 6]]))


@pytest.mark.parametrize("loss_fn", [cispo_loss, dapo_loss])
def test_masked_tokens_are_in_neither_numerator_nor_denominator(loss_fn):
    logp, old, adv, mask = _random_batch(4)
    _, loss, _ = grad_of(loss_fn, logp, old, adv, mask)
    garbage = torch.randn_like(logp) * 50
    off = mask == 0
    _, loss2, _ = grad_of(loss_fn, torch.where(off, garbage, logp), torch.where(off, -garbage, old), adv, mask)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    # truncated responses padded with masked columns: the same loss
    pad = torch.zeros(logp.shape[0], 5)
    _, loss3, _ = grad_of(loss_fn, torch.cat([logp, pad], 1), torch.cat([old, pad + 3], 1), adv,
                          torch.cat([mask, pad], 1))
    assert loss3.item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("loss_fn", [cispo_loss, dapo_loss])
def test_token_normalisation_is_invariant_to_micro_batches(loss_fn):
    logp, old, adv, mask = _random_batch(5, n=8)
    g_full, _, _ = grad_of(loss_fn, logp, old, adv, mask)
    n = mask.sum()
    g_split = torch.cat([grad_of(loss_fn, logp[i:i + 3], old[i:i + 3], adv[i:i + 3], mask[i:i + 3],
                                 num_tokens=n)[0] for i in range(0, 8, 3)])
    assert torch.allclose(g_full, g_split, atol=1e-7)


def _rank(rank, world, init, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    logp, old, adv, mask = _random_batch(6, n=8)
    rows = slice(rank * 4, rank * 4 + 4)  # each rank holds half the responses
    count = mask[rows].sum().reshape(1)
    dist.all_reduce(count)  # the step's token count over every rank
    w = torch.zeros_like(logp).requires_grad_(True)  # one shared parameter: a logit offset per position
    loss, _ = cispo_loss((logp + w)[rows], old[rows], adv[rows], mask[rows], num_tokens=count)
    loss.backward()
    dist.all_reduce(w.grad)  # data parallel: gradients summed over ranks
    results[rank] = w.grad.clone()
    dist.destroy_process_group()


def test_token_normalisation_is_invariant_to_ranks(tmp_path):
    logp, old, adv, mask = _random_batch(6, n=8)
    g_full, _, _ = grad_of(cispo_loss, logp, old, adv, mask)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'store'}", results), nprocs=2)
    assert torch.allclose(results[0], g_full, atol=1e-7) and torch.allclose(results[1], g_full, atol=1e-7)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    adv, stats = group_advantages(rewards, 4)
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2 agrees: zeros
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]), atol=1e-5)
    assert stats["zero_variance"].tolist() == [False, True] and stats["zero_variance_groups"] == 1
    adv_b, _ = group_advantages(rewards, 4, scale="batch")
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    assert torch.allclose(adv_b, centred / centred.std(), atol=1e-5)
    assert torch.equal(group_advantages(rewards, 4, scale=None)[0], centred)
    with pytest.raises(ValueError, match="do not split into groups"):
        group_advantages(rewards, 3)


def test_offsets_are_validated():
    logp, old, adv, mask = _random_batch(7)
    with pytest.raises(ValueError, match=r"eps_high = -1: an offset from 1"):
        cispo_loss(logp, old, adv, mask, eps_high=-1)
    with pytest.raises(ValueError, match="same \\[N, T\\] shape"):
        dapo_loss(logp, old[:, :3], adv, mask)
    assert math.isfinite(cispo_loss(logp, old, adv, torch.zeros_like(mask))[0].item())  # no tokens: 0, not nan
