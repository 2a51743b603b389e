"""The generation loop: greedy decoding equals the argmax of full forwards; batching and left
padding change nothing; stop ids; seeded sampling."""

import pytest
import torch

from xinzhou.config import preset
from xinzhou.engine import SamplingConfig, generate, sample_next
from xinzhou.model import XinzhouLM

V = 61


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return XinzhouLM(preset("tiny", vocab_size=V, initializer_range=0.3, layer_types=("lightning", "softmax"))).eval()


def greedy_by_full_forward(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_matches_full_forward_and_batching_changes_nothing(model):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [5]]
    cfg = SamplingConfig(max_new_tokens=8)
    batched = generate(model, prompts, cfg)
    for p, out in zip(prompts, batched):
        assert out.ids == greedy_by_full_forward(model, p, 8)
        assert out.ids == generate(model, [p], cfg)[0].ids
        assert out.finish_reason == "length" and len(out.logprobs) == 8
        assert all(lp <= 0 for lp in out.logprobs)


def test_stop_ids_end_each_sequence(model):
    prompt = [4, 4, 4]
    free = generate(model, [prompt], SamplingConfig(max_new_tokens=6))[0].ids
    stop = free[2]
    outs = generate(model, [prompt, [9, 9]], SamplingConfig(max_new_tokens=6, stop_ids=(stop,)))
    first = free.index(stop)
    assert outs[0].ids == free[:first + 1] and outs[0].finish_reason == "stop"
    # the other sequence is not cut by its neighbour's stop
    assert outs[1].ids == generate(model, [[9, 9]], SamplingConfig(max_new_tokens=6, stop_ids=(stop,)))[0].ids


def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy(model):
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    a = generate(model, [[1, 2], [3]], cfg)
    b = generate(model, [[1, 2], [3]], cfg)
    assert [o.ids for o in a] == [o.ids for o in b]
    k1 = generate(model, [[1, 2]], SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=1, seed=5))
    assert k1[0].ids == generate(model, [[1, 2]], SamplingConfig(max_new_tokens=10))[0].ids


def test_top_p_keeps_the_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = [sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.7), g) for _ in range(300)]
    assert {int(t) for t, _ in draws} == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are never drawn
    # log-probs are those of the distribution sampled from: 0.5 / 0.8 and 0.3 / 0.8
    for t, lp in draws[:20]:
        assert lp.item() == pytest.approx(torch.log(torch.tensor([0.625, 0.375]))[int(t)].item(), abs=1e-5)
    tok, lp = sample_next(logits, SamplingConfig(temperature=1.0, top_k=1), g)
    assert int(tok) == 0 and lp.item() == pytest.approx(0.0, abs=1e-6)


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], SamplingConfig())
