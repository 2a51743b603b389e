"""The continuous-batching engine: every request's greedy tokens equal naive full-forward greedy
decoding whatever else is in the batch and whenever it joined; admission, cancellation, per-request
sampling, stops, text deltas, log-probabilities and prefix reuse."""

import random

import pytest
import torch

from xinzhou.cache import cache_sizes
from xinzhou.config import preset
from xinzhou.engine import (Engine, Finished, SamplingParams, TextDelta, Token, generate, token_logprobs)
from xinzhou.model import XinzhouLM

V = 61


def tiny(kind: str, seed: int = 0, vocab: int = V) -> XinzhouLM:
    torch.manual_seed(seed)
    if kind == "hybrid":
        cfg = preset("tiny", vocab_size=vocab, layer_types=("lightning", "softmax", "lightning"), block_size=16,
                     initializer_range=0.3)
    else:
        cfg = preset("tiny", vocab_size=vocab, layer_types=("softmax",) * 2, router="sigmoid", qk_norm=True,
                     residual="prenorm", norm_eps=1e-6, initializer_range=0.3)
    return XinzhouLM(cfg).eval()


@pytest.fixture(scope="module", params=["hybrid", "m2"])
def model(request):
    return tiny(request.param)


def naive_greedy(model: XinzhouLM, prompt: list[int], n: int, stop: tuple[int, ...] = ()) -> list[int]:
    """No cache: the whole sequence recomputed for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] in stop:
                break
    return ids[len(prompt):]


def run(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]] | None = None,
        cancel_at: dict[int, int] | None = None) -> tuple[dict, list[list]]:
    """Step until done, adding arrivals[step] before each step; returns per request (tokens,
    logprobs, text, finished event) and the events of every step."""
    arrivals, cancel_at = arrivals or {}, cancel_at or {}
    out: dict[int, dict] = {}
    steps = []
    step = 0
    while engine.has_work() or any(s >= step for s in arrivals):
        for prompt, params in arrivals.get(step, []):
            rid = engine.add_request(prompt, params)
            out[rid] = dict(prompt=prompt, tokens=[], logprobs=[], text="", finished=None, joined=step)
        for rid, s in cancel_at.items():
            if s == step:
                engine.cancel(rid)
        events = engine.step()
        steps.append(events)
        for e in events:
            r = out[e.request_id]
            assert r["finished"] is None, "an event after Finished"
            if isinstance(e, Token):
                r["tokens"].append(e.token_id)
                r["logprobs"].append(e.logprob)
            elif isinstance(e, TextDelta):
                r["text"] += e.text
            else:
                r["finished"] = e
        step += 1
        assert step < 5000
    return out, steps


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_greedy_equals_naive_whatever_the_batch_and_arrival(model, cuda_graphs):
    # cuda_graphs on a CPU: decode steps run at the padded fixed shapes a graph would replay
    rng = random.Random(0)
    arrivals: dict[int, list] = {}
    lengths = [1, 2, 200, 5, 90, 1, 33, 150, 7, 64, 3, 120, 11, 17]
    for i, n in enumerate(lengths):
        prompt = [rng.randrange(V) for _ in range(n)]
        params = SamplingParams(max_new_tokens=rng.randint(1, 9))
        arrivals.setdefault(rng.randrange(0, 40), []).append((prompt, params))
    # 3 slots, 40 tokens a step: long prompts prefill in chunks beside decoding requests, slots reused;
    # with graphs 5 slots, so that 3 decoding rows run in the bucket of 4, one row of it padding
    slots = 5 if cuda_graphs else 3
    engine = Engine(model, max_batch=slots, max_tokens_per_step=40, page_size=8, cuda_graphs=cuda_graphs)
    out, steps = run(engine, arrivals)
    assert len(out) == len(lengths)
    chunked = sum(1 for events in steps if not events)  # steps that only prefilled a chunk
    assert chunked > 0
    for r in out.values():
        n = len(r["tokens"])
        assert r["tokens"] == naive_greedy(model, r["prompt"], n)
        assert r["finished"].reason == "length" and n == r["finished"].usage.completion_tokens
        assert r["finished"].usage.prompt_tokens == len(r["prompt"])
    assert len(engine.cache.free_slots) == slots
    held = {p for snap in engine.prefix.entries.values() for p in snap.pages}
    free = set(engine.cache.free_pages)  # every page is free or held by a prefix snapshot, not both
    scratch = set(engine.cache.pages[engine.graphs.scratch]) if cuda_graphs else set()  # or is the padding's
    assert free | held | scratch == set(range(engine.cache.num_pages)) and not free & held and not free & scratch
    if cuda_graphs:  # decode steps of 1 to 5 rows ran in buckets 1, 2, 4 and 5 (max_batch)
        assert {b for b, _ in engine.graphs.shapes} >= {1, 2, 4} and len(scratch) == 1
    assert engine.prefill_tokens == sum(lengths) - sum(r["finished"].usage.cached_prompt_tokens for r in out.values())


def test_fixed_shape_decode_gives_the_eager_logits_and_leaves_other_slots_alone(model):
    """Padded decode steps against eager steps on a twin cache: 3 rows, then 4, then 3 in another
    order and 2, all in the batch bucket of 4 (so a step's padding row is where the step before had
    a real one), then 1 row alone: the same logits at every step, and the same keys, values and
    lightning states in every slot but the scratch one (slot 5 never decodes and is never touched)."""
    from xinzhou.cache import HybridCache
    from xinzhou.engine.graphs import DecodeGraphs

    caches = [HybridCache(model.config, 6, num_pages=30, page_size=4) for _ in range(2)]
    prompts = {1: [3, 1, 4, 1, 5, 9, 2], 2: [6, 6], 3: [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4], 4: [9, 9, 9], 5: [1, 2]}
    with torch.no_grad():
        for cache in caches:
            for slot, prompt in prompts.items():
                model(torch.tensor([prompt]), cache=cache, slots=[slot])
    scratch = 0
    caches[1].free_slots.remove(scratch)
    caches[1].reserve(scratch, 1)
    graphs = DecodeGraphs(model, caches[1], scratch, max_batch=4, capture=False)
    steps = [[3, 1, 4], [1, 2, 3, 4], [4, 3, 1], [2, 4], [3]]
    with torch.no_grad():
        for i, slots in enumerate(steps):
            tokens = [(7 * i + 3 * j) % V for j in range(len(slots))]
            cu = torch.arange(len(slots) + 1)
            eager = model(torch.tensor([tokens]), cu_seqlens=cu, cache=caches[0], slots=slots, last_logits_only=True)[0]
            fixed = graphs.step(tokens, slots)
            assert fixed.shape == (len(slots), V)
            torch.testing.assert_close(fixed, eager, rtol=1e-4, atol=1e-4)
    assert caches[1].lengths[1:] == caches[0].lengths[1:] == [10, 4, 15, 7, 2]
    assert set(graphs.shapes) == {(4, 16), (2, 16), (1, 16)}  # batch buckets; up to 16 keys -> width 16
    assert graphs.shape_for(3, 17) == (4, 32) and graphs.shape_for(1, 33) == (1, 64)
    for layer in caches[0].lightning_layers:  # other shapes round differently: close, not equal
        assert torch.equal(caches[1].state[layer][5], caches[0].state[layer][5])
        torch.testing.assert_close(caches[1].state[layer][1:], caches[0].state[layer][1:], rtol=1e-3, atol=1e-4)
    for layer in caches[0].kv_layers:
        for slot in range(1, 6):  # each slot's keys and values, at the pool rows of its pages in each cache
            rows = [torch.tensor([p * 4 + i for p in c.pages[slot] for i in range(4)])[:c.lengths[slot]]
                    for c in caches]
            for pools in ((c.k_pool[layer] for c in caches), (c.v_pool[layer] for c in caches)):
                a, b = (pool[r] for pool, r in zip(pools, rows))
                torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="more than max_batch = 4"):
        graphs.shape_for(5, 10)
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        DecodeGraphs(model, caches[1], scratch, max_batch=4, capture=True)


def test_fixed_shape_decode_without_softmax_layers_has_one_shape_per_batch():
    """No layer reads keys, so no key-length buckets: every decode step of one row is the same shape."""
    torch.manual_seed(0)
    lightning = XinzhouLM(preset("tiny", vocab_size=V, layer_types=("lightning",) * 2, block_size=16,
                                 initializer_range=0.3)).eval()
    engine = Engine(lightning, max_batch=2, cuda_graphs=True)
    prompt = [5, 3, 8]
    out, _ = run(engine, {0: [(prompt, SamplingParams(max_new_tokens=20))]})
    assert out[0]["tokens"] == naive_greedy(lightning, prompt, 20)
    assert set(engine.graphs.shapes) == {(1, 1)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs are captured on a CUDA GPU only")
def test_decode_graphs_on_cuda_replay_the_eager_step():
    """Captured and replayed (bf16, CUDA): each replay reads the step's own inputs (steps of other
    tokens, slots and lengths through one graph) and gives the eager step's logits to bf16
    rounding; the engine with graphs picks, at every step, a token whose logit in a full forward of
    the finished sequence is the maximum to bf16 rounding (a near tie may go either way, and stale
    inputs would miss by whole units). Also on CUDA: a prompt prefilled in chunks (each after the
    first attends through the lower-right causal bias, with grouped KV heads: FlashAttention's path
    on a recent GPU) ends on the logits of one full forward."""
    from xinzhou.cache import HybridCache
    from xinzhou.engine.graphs import DecodeGraphs

    dev = "cuda"
    model = tiny("hybrid").to(dev).to(torch.bfloat16)
    caches = [HybridCache(model.config, 5, num_pages=24, page_size=4, device=dev, dtype=torch.bfloat16)
              for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            for slot, prompt in {1: [3, 1, 4, 1, 5], 3: [2, 7, 1, 8, 2, 8, 1], 4: [9, 9, 9]}.items():
                model(torch.tensor([prompt], device=dev), cache=cache, slots=[slot])
    caches[1].free_slots.remove(0)
    caches[1].reserve(0, 1)
    graphs = DecodeGraphs(model, caches[1], 0, max_batch=4, capture=dev == "cuda")
    with torch.no_grad():
        for tokens, slots in (([10, 20, 1], [3, 1, 4]), ([30, 2], [4, 1]), ([50, 7, 3], [1, 4, 3])):
            cu = torch.arange(len(tokens) + 1, device=dev)
            eager = model(torch.tensor([tokens], device=dev), cu_seqlens=cu, cache=caches[0], slots=slots,
                          last_logits_only=True)[0]
            torch.testing.assert_close(graphs.step(tokens, slots), eager, rtol=0.03, atol=0.3)
    assert len(graphs.shapes) == 2 and all((s.graph is not None) == (dev == "cuda") for s in graphs.shapes.values())
    prompts = [[random.Random(i).randrange(V) for _ in range(20 + 7 * i)] for i in range(3)]
    out, _ = run(Engine(model, max_batch=4, cuda_graphs=True),
                 {0: [(p, SamplingParams(max_new_tokens=12)) for p in prompts]})
    with torch.no_grad():
        for r in out.values():
            ids = r["prompt"] + r["tokens"]
            logits = model(torch.tensor([ids], device=dev))[0, len(r["prompt"]) - 1:-1].float()  # [12, V]
            picked = logits.gather(1, torch.tensor(r["tokens"], device=dev)[:, None])[:, 0]
            assert (logits.max(1).values - picked).max() <= 0.3
    prompt = prompts[2]
    cache = HybridCache(model.config, 1, num_pages=16, page_size=4, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        for a in range(0, len(prompt), 16):
            last = model(torch.tensor([prompt[a:a + 16]], device=dev), cache=cache)[0, -1]
        full = model(torch.tensor([prompt], device=dev))[0, -1]
    torch.testing.assert_close(last, full, rtol=0.03, atol=0.3)


def test_generate_wrapper_matches_naive_and_reports_stops(model):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [5]]
    outs = generate(model, prompts, SamplingParams(max_new_tokens=6))
    for p, o in zip(prompts, outs):
        assert o.ids == naive_greedy(model, p, 6) and o.finish_reason == "length"
    stop = outs[1].ids[2]
    stopped = generate(model, prompts, SamplingParams(max_new_tokens=6, stop_ids=(stop,)))
    for p, o in zip(prompts, stopped):
        assert o.ids == naive_greedy(model, p, 6, stop=(stop,))
        assert o.finish_reason == ("stop" if o.ids[-1] == stop else "length")
    assert stopped[1].finish_reason == "stop" and len(stopped[1].ids) <= 3


def test_logprobs_are_token_logprobs_of_the_full_sequence(model):
    engine = Engine(model, max_batch=2, max_tokens_per_step=16)
    params = [SamplingParams(max_new_tokens=6, temperature=1.3, top_k=5, top_p=0.8, seed=3),
              SamplingParams(max_new_tokens=5)]
    prompts = [list(range(3, 40)), [4, 9]]
    out, _ = run(engine, {0: [(prompts[0], params[0])], 2: [(prompts[1], params[1])]})
    for r in out.values():
        ids = r["prompt"] + r["tokens"]
        want = token_logprobs(model, ids, start=len(r["prompt"]))
        assert torch.allclose(torch.tensor(r["logprobs"]), want, atol=1e-4)
    # the raw distribution, before temperature / top-k / top-p: a sampled token outside the top
    # 5 would have -inf under the sampling distribution, and here it is finite and not 0
    assert all(lp < 0 for lp in out[0]["logprobs"])
    no_lp, _ = run(Engine(model), {0: [([1, 2], SamplingParams(max_new_tokens=2, logprobs=False))]})
    assert no_lp[0]["logprobs"] == [None, None]


def test_seeded_samples_do_not_depend_on_neighbours(model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=42)
    alone, _ = run(Engine(model, max_batch=1), {0: [([3, 1, 4, 1, 5], params)]})
    noise = [([9] * 30, SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)),
             ([2, 7], SamplingParams(max_new_tokens=3))]
    crowded, _ = run(Engine(model, max_batch=3, max_tokens_per_step=8),
                     {0: noise, 3: [([3, 1, 4, 1, 5], params)]})
    assert alone[0]["tokens"] == crowded[2]["tokens"]
    other, _ = run(Engine(model, max_batch=1), {0: [([3, 1, 4, 1, 5], SamplingParams(
        max_new_tokens=12, temperature=1.0, seed=43))]})
    assert other[0]["tokens"] != alone[0]["tokens"]


def test_admission_waits_for_memory_and_refuses_what_never_fits(model):
    # pages for one request of 40 prompt + 8 new tokens at a time (page 8: 6 pages), two slots
    page_bytes, state_bytes = cache_sizes(model.config, 8, torch.float32)
    engine = Engine(model, max_batch=2, max_tokens_per_step=64, page_size=8, prefix_reuse=False,
                    cache_bytes=2 * state_bytes + 6 * page_bytes)
    assert engine.cache.kv_layers  # both fixture models have softmax layers, so pages bound admission
    with pytest.raises(ValueError, match="needs 7 KV pages of 8 tokens; the cache has 6 in all"):
        engine.add_request([1] * 41, SamplingParams(max_new_tokens=8))
    a = [random.Random(1).randrange(V) for _ in range(40)]
    b = [random.Random(2).randrange(V) for _ in range(40)]
    out, steps = run(engine, {0: [(a, SamplingParams(max_new_tokens=8)), (b, SamplingParams(max_new_tokens=8))]})
    first_b = next(i for i, ev in enumerate(steps) if any(e.request_id == 1 for e in ev))
    done_a = next(i for i, ev in enumerate(steps) if any(isinstance(e, Finished) and e.request_id == 0 for e in ev))
    assert first_b > done_a  # b waited for a's pages
    assert out[0]["tokens"] == naive_greedy(model, a, 8) and out[1]["tokens"] == naive_greedy(model, b, 8)


def test_cancel_frees_the_slot_within_one_step(model):
    engine = Engine(model, max_batch=1, max_tokens_per_step=32, prefix_reuse=False)
    a = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=50))
    b = engine.add_request([4, 5], SamplingParams(max_new_tokens=3))
    for _ in range(3):
        assert all(e.request_id == a for e in engine.step())
    engine.cancel(a)
    assert engine.cache.free_slots == [0] and len(engine.cache.free_pages) == engine.cache.num_pages
    events = engine.step()
    fin = [e for e in events if isinstance(e, Finished)]
    assert fin[0].request_id == a and fin[0].reason == "cancelled" and fin[0].usage.completion_tokens == 3
    assert any(isinstance(e, Token) and e.request_id == b for e in events)  # b took the slot at once
    engine.cancel(a)  # cancelling a finished request is a no-op
    waiting = engine.add_request([6], SamplingParams(max_new_tokens=2))
    engine.cancel(waiting)
    assert [e.reason for e in engine.step() if isinstance(e, Finished) and e.request_id == waiting] == ["cancelled"]
    with pytest.raises(ValueError, match="no request with id 99"):
        engine.cancel(99)


@pytest.fixture(scope="module")
def tokenizer():
    from xinzhou.tokenizer import train_tokenizer
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hum a tune".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    return train_tokenizer(texts, vocab_size=320)


def test_stop_strings_end_the_request_and_never_reach_the_text(tokenizer):
    model = tiny("hybrid", seed=5, vocab=tokenizer.vocab_size)
    prompt = tokenizer.encode("the quick brown fox")
    free, _ = run(Engine(model, tokenizer), {0: [(prompt, SamplingParams(max_new_tokens=40))]})
    text = free[0]["text"]
    assert text == tokenizer.decode(free[0]["tokens"]) and len(text) > 12
    stop = text[8:11]  # stops inside the text, possibly across tokens
    first = text.find(stop)
    got, _ = run(Engine(model, tokenizer), {0: [(prompt, SamplingParams(max_new_tokens=40, stop_strings=(stop, "@@")))]})
    r = got[0]
    assert r["text"] == text[:first] and r["finished"].reason == "stop"
    # the tokens go up to the one that completed the stop string
    n = len(r["tokens"])
    assert r["tokens"] == free[0]["tokens"][:n]
    assert stop in tokenizer.decode(r["tokens"]) and stop not in tokenizer.decode(r["tokens"][:-1])
    # a stop id ends the text before its own marker; text deltas join to the decoded tokens otherwise
    eos = free[0]["tokens"][5]
    by_id, _ = run(Engine(model, tokenizer), {0: [(prompt, SamplingParams(max_new_tokens=40, stop_ids=(eos,)))]})
    k = free[0]["tokens"].index(eos)
    assert by_id[0]["tokens"] == free[0]["tokens"][:k + 1] and by_id[0]["text"] == tokenizer.decode(free[0]["tokens"][:k])
    with pytest.raises(ValueError, match="need a tokenizer"):
        Engine(model).add_request(prompt, SamplingParams(stop_strings=("x",)))


def test_second_turn_prefills_only_its_new_tokens(model):
    engine = Engine(model, max_batch=2, max_tokens_per_step=64, page_size=8)
    rng = random.Random(3)
    turn1 = [rng.randrange(V) for _ in range(77)]
    out, _ = run(engine, {0: [(turn1, SamplingParams(max_new_tokens=9))]})
    reply = out[0]["tokens"]
    assert engine.prefill_tokens == 77 and out[0]["finished"].usage.cached_prompt_tokens == 0
    user = [rng.randrange(V) for _ in range(13)]
    turn2 = turn1 + reply + user
    before = engine.prefill_tokens
    out2, _ = run(engine, {0: [(turn2, SamplingParams(max_new_tokens=6))]})
    r = out2[1]
    # the turn-end snapshot holds the prompt and every reply token but the last
    assert r["finished"].usage.cached_prompt_tokens == 77 + 9 - 1
    assert engine.prefill_tokens - before == 1 + 13
    assert r["tokens"] == naive_greedy(model, turn2, 6)
    # logits after reuse equal a fresh prefill's: the log-probabilities of the reply say so
    assert torch.allclose(torch.tensor(r["logprobs"]), token_logprobs(model, turn2 + r["tokens"], start=len(turn2)),
                          atol=1e-4)
    # a different conversation sharing only the first prompt restores the prompt snapshot
    other = turn1 + [rng.randrange(V) for _ in range(5)]
    out3, _ = run(engine, {0: [(other, SamplingParams(max_new_tokens=3))]})
    assert out3[2]["finished"].usage.cached_prompt_tokens == 77
    assert out3[2]["tokens"] == naive_greedy(model, other, 3)


def test_prefix_snapshots_are_bounded_and_give_their_pages_back(model):
    engine = Engine(model, max_batch=2, max_tokens_per_step=64, page_size=4, prefix_entries=3)
    rng = random.Random(4)
    for i in range(10):
        run(engine, {0: [([rng.randrange(V) for _ in range(rng.randint(5, 30))], SamplingParams(max_new_tokens=3))]})
        assert len(engine.prefix) <= 3
    held = {p for s in engine.prefix.entries.values() for p in s.pages}
    assert len(engine.cache.free_pages) == engine.cache.num_pages - len(held)
    engine.prefix.clear()
    assert len(engine.cache.free_pages) == engine.cache.num_pages


def test_a_32k_prompt_prefills_in_chunks_with_constant_lightning_state():
    torch.manual_seed(0)
    model = XinzhouLM(preset("tiny", vocab_size=101)).eval()  # LLLS
    prompt = torch.randint(0, 101, (32768,), generator=torch.Generator().manual_seed(1)).tolist()
    results = []
    for chunk in (2048, 4096):
        engine = Engine(model, max_batch=1, max_tokens_per_step=chunk, cache_bytes=40 << 20, prefix_reuse=False)
        shapes = {i: s.shape for i, s in engine.cache.state.items()}
        memory = engine.cache.memory_bytes()
        rid = engine.add_request(prompt, SamplingParams(max_new_tokens=2))
        steps, tokens = 0, []
        while engine.has_work():
            tokens += [(e.token_id, e.logprob) for e in engine.step() if isinstance(e, Token)]
            steps += 1
            assert {i: s.shape for i, s in engine.cache.state.items()} == shapes  # [1, H, D, D] throughout
            assert engine.cache.memory_bytes() == memory  # a fixed pool: nothing grows with the prompt
        # one step per chunk (the last samples the first token), then one decode step
        assert steps == 32768 // chunk + 1 and engine.prefill_tokens == 32768 and rid == 0
        results.append(tokens)
    # chunking changes nothing but float rounding
    assert [t for t, _ in results[0]] == [t for t, _ in results[1]]
    assert results[0][0][1] == pytest.approx(results[1][0][1], abs=1e-4)


def test_a_guide_forces_and_bans_tokens_and_the_rest_is_greedy(model):
    """Forced tokens come out as given; banned ids never appear; every other token is the greedy
    choice of the model over the banned-masked logits, with the forced tokens in the context."""
    prompt = [5, 9, 2, 7]
    free = naive_greedy(model, prompt, 12)
    banned = (free[0], free[1])  # the tokens it would pick: the ban must change the output
    forced = {2: 33, 3: 34}  # output positions -> forced ids

    def guide(output):
        return forced.get(len(output)), banned

    engine = Engine(model, max_batch=2)
    other = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=12))  # a neighbour, unguided
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=12), guide=guide)
    tokens = {other: [], rid: []}
    while engine.has_work():
        for e in engine.step():
            if isinstance(e, Token):
                tokens[e.request_id].append(e.token_id)
    out = tokens[rid]
    assert [out[k] for k in forced] == list(forced.values())
    assert not set(banned) & {t for k, t in enumerate(out) if k not in forced}
    with torch.no_grad():  # the reference: masked greedy over the full sequence, step by step
        ids = list(prompt)
        for k in range(12):
            logits = model(torch.tensor([ids]))[0, -1]
            logits[list(banned)] = float("-inf")
            ids.append(forced.get(k, int(logits.argmax())))
    assert out == ids[len(prompt):]
    assert tokens[other] == naive_greedy(model, [1, 2, 3], 12)  # its neighbour is untouched
    with pytest.raises(ValueError, match="guide"):
        engine.add_request(prompt, SamplingParams(), guide=[1, 2])
