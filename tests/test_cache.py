"""The cache owns its bookkeeping (per-slot lengths, paged KV, constant-size lightning state) and
packed (varlen) forwards equal separate ones, with and without a cache."""

import pytest
import torch

from xinzhou.cache import CacheFull, HybridCache
from xinzhou.config import preset
from xinzhou.model import XinzhouLM

V = 97


def make_model(kind: str, seed: int = 0) -> XinzhouLM:
    torch.manual_seed(seed)
    if kind == "hybrid":
        cfg = preset("tiny", vocab_size=V, layer_types=("lightning", "softmax", "lightning"), block_size=8,
                     initializer_range=0.2)
    else:
        cfg = preset("tiny", vocab_size=V, layer_types=("softmax",) * 2, router="sigmoid", qk_norm=True,
                     residual="prenorm", norm_eps=1e-6, initializer_range=0.2)
    model = XinzhouLM(cfg).eval()
    if kind == "m2":
        with torch.no_grad():
            for block in model.layers:
                block.moe.correction_bias.copy_(torch.randn(4) * 0.3)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def cu_of(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])


@pytest.mark.parametrize("kind", ["hybrid", "m2"])
def test_packed_forward_equals_separate_forwards(kind):
    model = make_model(kind)
    lens = [1, 7, 30, 19, 1]  # 30 crosses the block size 8 several times
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, V, (1, n), generator=g) for n in lens]
    packed = torch.cat(seqs, 1)
    with torch.no_grad():
        out = model(packed, cu_seqlens=cu_of(lens))
        last = model(packed, cu_seqlens=cu_of(lens), last_logits_only=True)
        assert out.shape == (1, sum(lens), V) and last.shape == (1, len(lens), V)
        a = 0
        for i, s in enumerate(seqs):
            ref = model(s)
            assert ref.abs().max() > 1.0
            assert max_diff(out[:, a:a + s.shape[1]], ref) <= 1e-4
            assert max_diff(last[0, i], ref[0, -1]) <= 1e-4
            a += s.shape[1]
        # a packed batch is not one long sequence: the boundaries matter
        assert max_diff(out, model(packed)) > 1e-2


@pytest.mark.parametrize("kind", ["hybrid", "m2"])
def test_packed_gradients_equal_separate_gradients(kind):
    model = make_model(kind, seed=3).train()
    lens = [5, 12, 9]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, V, (1, n), generator=g) for n in lens]
    w = torch.randn(1, sum(lens), V, generator=g)
    (model(torch.cat(seqs, 1), cu_seqlens=cu_of(lens)) * w).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    a = 0
    for s in seqs:
        (model(s) * w[:, a:a + s.shape[1]]).sum().backward()
        a += s.shape[1]
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert (packed_grads[n] - p.grad).norm() <= 1e-4 * p.grad.norm().clamp(min=1e-6), n


@pytest.mark.parametrize("kind", ["hybrid", "m2"])
def test_packed_step_continues_slots_of_different_lengths(kind):
    # slots with 3, 17 and 0 cached tokens each take a different number of new tokens in one call
    model = make_model(kind, seed=4)
    g = torch.Generator().manual_seed(5)
    full = [torch.randint(0, V, (1, n), generator=g) for n in (3 + 6, 17 + 1, 0 + 11)]
    cached = [3, 17, 0]
    with torch.no_grad():
        cache = HybridCache(model.config, 4, page_size=4)
        for slot, (x, c) in enumerate(zip(full, cached)):
            if c:
                model(x[:, :c], cache=cache, slots=[slot + 1])  # slots 1..3: slot 0 stays empty
        new = [x[:, c:] for x, c in zip(full, cached)]
        lens = [t.shape[1] for t in new]
        out = model(torch.cat(new, 1), cu_seqlens=cu_of(lens), cache=cache, slots=[1, 2, 3])
        assert cache.lengths == [0, 9, 18, 11]
        a = 0
        for x, c, n in zip(full, cached, lens):
            assert max_diff(out[:, a:a + n], model(x)[:, c:]) <= 1e-4
            a += n
        assert all(s[0].abs().max() == 0 for s in cache.state.values())  # the idle slot is untouched


def test_lightning_state_is_constant_size_and_pages_come_back():
    model = make_model("hybrid")
    cache = HybridCache(model.config, 2, num_pages=16, page_size=4)
    before = cache.memory_bytes()
    shapes = {i: s.shape for i, s in cache.state.items()}
    with torch.no_grad():
        model(torch.randint(0, V, (1, 33)), cache=cache, slots=[0])
        for _ in range(7):
            model(torch.randint(0, V, (1, 1)), cache=cache, slots=[0])
    assert cache.lengths[0] == 40 and len(cache.pages[0]) == 10
    assert {i: s.shape for i, s in cache.state.items()} == shapes and cache.memory_bytes() == before
    assert len(cache.free_pages) == 6
    cache.release(0)
    assert len(cache.free_pages) == 16 and cache.pages[0] == [] and cache.lengths[0] == 0


def test_a_fixed_pool_refuses_without_taking_pages():
    model = make_model("m2")
    cache = HybridCache(model.config, 2, num_pages=3, page_size=4)
    assert cache.can_reserve(0, 12) and not cache.can_reserve(0, 13)
    cache.reserve(1, 5)  # two pages
    with pytest.raises(CacheFull, match="needs 2 more pages of 4 tokens; 1 of 3 are free"):
        model(torch.randint(0, V, (1, 6)), cache=cache, slots=[0])
    assert len(cache.free_pages) == 1 and cache.pages[0] == []


def test_a_long_lived_cache_does_not_grow():
    # 1,000 short requests in sequence through two slots of a growable pool: after the first few,
    # freed pages are reused and the memory stays where it was
    model = make_model("hybrid")
    cache = HybridCache(model.config, 2, page_size=4)
    g = torch.Generator().manual_seed(0)
    sizes = []
    with torch.no_grad():
        for r in range(1000):
            slot = r % 2
            n = int(torch.randint(1, 14, (1,), generator=g))
            if r < 20:  # the model for the first ones; then the cache's own calls, same bookkeeping
                model(torch.randint(0, V, (1, n), generator=g), cache=cache, slots=[slot])
            else:
                packing = cache.begin([slot], [n])
                kv = torch.randn(n, model.config.num_kv_heads, model.config.head_dim, generator=g)
                for layer in cache.kv_layers:
                    cache.write_and_read(layer, kv, kv, packing)
                cache.end(packing)
            if r % 2:
                cache.release(0)
                cache.release(1)
            sizes.append(cache.memory_bytes())
    assert sizes[-1] == sizes[10] and max(sizes) == sizes[10]
    assert len(cache.free_pages) == cache.num_pages


def test_bad_layouts_are_named():
    model = make_model("hybrid")
    cache = HybridCache(model.config, 2)
    x = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match="batch 1"):
        model(x, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        model(x[:1], cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="attention_mask and position_ids are for a plain uncached batch"):
        model(x, attention_mask=torch.ones_like(x), cache=cache)
    with pytest.raises(ValueError, match="a slot can appear once"):
        model(x, cache=cache, slots=[1, 1])
    with pytest.raises(ValueError, match="slot 2 is outside"):
        model(x[:1], cache=cache, slots=[2])
    with pytest.raises(ValueError, match="pass cache="):
        model(x, slots=[0, 1])
    with pytest.raises(ValueError, match="at least one token"):
        model(x[:1], cu_seqlens=torch.tensor([0, 0, 4]))


@pytest.mark.parametrize("kind", ["hybrid", "m2"])
def test_snapshot_restore_shares_full_pages_and_copies_the_partial_one(kind):
    model = make_model(kind, seed=6)
    cache = HybridCache(model.config, 3, num_pages=12, page_size=4)
    x = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model(x[:, :10], cache=cache, slots=[0])  # pages 0, 1 full; page 2 holds positions 8, 9
        snap = cache.snapshot(0)
        assert snap.length == 10 and snap.pages == cache.pages[0]
        a = model(x[:, 10:13], cache=cache, slots=[0])  # slot 0 writes positions 10..12 into page 2
        cache.restore(1, snap)
        assert cache.pages[1][:2] == snap.pages[:2] and cache.pages[1][2] != snap.pages[2]
        b = model(x[:, 10:13], cache=cache, slots=[1])
        assert max_diff(a, b) <= 1e-5 and max_diff(b, model(x[:, :13])[:, 10:]) <= 1e-4
        # slot 1's writes went to its own copy: slot 0 continues exactly
        c = model(x[:, 13:16], cache=cache, slots=[0])
        assert max_diff(c, model(x)[:, 13:]) <= 1e-4
    cache.release(0)
    cache.release(1)
    assert len(cache.free_pages) == 12 - 3  # the snapshot still holds its three pages
    cache.drop(snap)
    assert len(cache.free_pages) == 12


@pytest.mark.parametrize("seqlens", [[7], [5, 1, 1], [1, 6], [4, 3, 1]])
def test_attention_without_a_built_mask_equals_the_masked_one(seqlens):
    """One sequence alone, or one prompt chunk beside decoding rows, attends with a causal bias
    aligned to its last key instead of a [Tm, S] mask (none is built for the one-sequence step);
    the outputs equal SDPA under the full mask. Several chunks at once still use a mask."""
    import torch.nn.functional as F

    cfg = preset("tiny", vocab_size=50, layer_types=("softmax",))
    cache = HybridCache(cfg, 4, num_pages=40, page_size=4)
    for slot, n in enumerate((9, 2, 13, 0)):
        cache.reserve(slot, n)
        cache.lengths[slot] = n
    packing = cache.begin(list(range(len(seqlens))), seqlens)
    g = torch.Generator().manual_seed(0)
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = torch.randn(1, sum(seqlens), H, D, generator=g)
    k = torch.randn(len(seqlens), KV, packing.keys, D, generator=g)
    v = torch.randn(len(seqlens), KV, packing.keys, D, generator=g)
    got = packing.attend(q, k, v, gqa=H != KV)
    if len(seqlens) == 1:
        assert packing._mask is None
    want = F.scaled_dot_product_attention(packing.pad(q).transpose(1, 2), k, v, attn_mask=packing.mask,
                                          enable_gqa=H != KV)
    torch.testing.assert_close(got, packing.unpad(want.transpose(1, 2)), rtol=1e-5, atol=1e-6)


def test_the_lower_right_bias_holds_no_storage():
    """torch's own causal_lower_right(8192, 2**20) allocates a 64 GiB float tensor (its legacy
    constructor); ours carries the lengths only and gives the same attention."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from xinzhou.cache import lower_right_bias

    big = lower_right_bias(8192, 2**20)
    assert big.untyped_storage().nbytes() == 0 and (big.seq_len_q, big.seq_len_kv) == (8192, 2**20)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 8, generator=g)
    k, v = torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    ours = F.scaled_dot_product_attention(q, k, v, attn_mask=lower_right_bias(5, 12), enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 12), enable_gqa=True)
    mask = torch.ones(5, 12, dtype=torch.bool).tril(7)  # query t sees keys up to 7 + t
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
