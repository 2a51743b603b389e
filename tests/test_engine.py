"""The generation loop: greedy decoding equals the argmax of full forwards; batching and left
padding change nothing; stop ids; seeded sampling."""

import pytest
import torch

from xinzhou.config import preset
from xinzhou.engine import SamplingConfig, generate, sample_token, stream, transform_logits
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
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    params = SamplingConfig(temperature=1.0, top_p=0.7)
    draws = [sample_token(logits, params, g) for _ in range(300)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are never drawn
    # the distribution sampled from: 0.5 / 0.8 and 0.3 / 0.8
    probs = torch.softmax(transform_logits(logits, params), -1)
    assert probs.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=1e-6)
    assert sample_token(logits, SamplingConfig(temperature=1.0, top_k=1), g) == 0
    # temperature 2 flattens: p ~ sqrt(p0) renormalised
    flat = torch.softmax(transform_logits(logits, SamplingConfig(temperature=2.0)), -1)
    want = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert torch.allclose(flat, want / want.sum(), atol=1e-6)


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="prompt 1 is empty: every prompt needs at least one token"):
        generate(model, [[1], []], SamplingConfig())


@pytest.mark.parametrize("field,value,hint", [
    ("max_new_tokens", -1, ">= 1"), ("max_new_tokens", 0, ">= 1"), ("max_new_tokens", 2.5, "int"),
    ("temperature", -0.5, ">= 0"), ("temperature", float("nan"), ">= 0"),
    ("top_p", 1.5, r"\(0, 1\]"), ("top_p", -0.1, r"\(0, 1\]"), ("top_p", 0, r"\(0, 1\]"),
    ("top_k", -1, ">= 0"), ("top_k", 1.0, "int"),
    ("stop_ids", 7, r"\(7,\) with the comma"), ("stop_ids", ("a",), "token ids"), ("stop_ids", (1.0,), "token ids"),
    ("stop_strings", "END", "tuple of strings"), ("stop_strings", ("",), "non-empty"),
    ("seed", 1.5, "int or None"), ("seed", "1", "int or None"),
])
def test_bad_sampling_fields_are_named(field, value, hint):
    with pytest.raises(ValueError, match=f"{field} = .*{hint}"):
        SamplingConfig(**{field: value})


def test_stop_ids_without_the_comma_is_refused_not_reinterpreted():
    eos = 3
    with pytest.raises(ValueError, match="with the comma"):
        SamplingConfig(stop_ids=(eos))  # noqa: the missing comma is the point
    assert SamplingConfig(stop_ids=[eos]).stop_ids == (eos,)  # a list is fine, stored as a tuple


@pytest.mark.parametrize("prompts,match", [
    ([1, 2, 3], "flat list of 3 ints"),
    ([], "prompts is empty"),
    ([[1], []], "prompt 1 is empty"),
    ([[1, 2], [3, V, 4]], f"prompt 1, position 1: token id {V} is outside"),
    ([[1, -1]], "prompt 0, position 1: token id -1 is outside"),
    ([[1, 2.0]], "prompt 0, position 1: token 2.0 is not an int"),
    ("hello", "expected a list"),
])
def test_bad_prompts_are_named(model, prompts, match):
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match=match):  # stream checks when called, not at the first token
        stream(model, prompts, SamplingConfig(max_new_tokens=2))


def test_prompt_beyond_max_positions_is_refused():
    torch.manual_seed(0)
    short = XinzhouLM(preset("tiny", vocab_size=V, layer_types=("lightning", "softmax"), max_position_embeddings=16))
    with pytest.raises(ValueError, match="prompt 0 has 17 tokens: more than max_position_embeddings = 16"):
        generate(short, [[1] * 17], SamplingConfig(max_new_tokens=1))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings = 16; lower max_new_tokens to at most 4"):
        generate(short, [[1] * 12], SamplingConfig(max_new_tokens=5))
    assert len(generate(short, [[1] * 12], SamplingConfig(max_new_tokens=4))[0].ids) == 4
