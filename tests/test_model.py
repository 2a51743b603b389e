"""The model against transformers' MiniMax models (the outside oracle), both directions, and
against the definitions (partial RoPE, decoding with the cache, padding)."""

import math
import warnings

import pytest
import torch

from xinzhou.cache import HybridCache
from xinzhou.config import preset
from xinzhou.hf import load_hf, save_hf
from xinzhou.model import XinzhouLM, apply_rope, lightning_slopes, rope_cos_sin

transformers = pytest.importorskip("transformers")  # installed by the test extra; needed as the oracle
warnings.filterwarnings("ignore")

V = 101
HYBRID_CASES = [
    # layer types, heads, kv heads, block size, alpha/beta factors
    (["linear_attention", "full_attention"], 4, 4, 256, {}),
    (["full_attention", "linear_attention", "linear_attention", "full_attention"], 4, 2, 7,
     dict(full_attn_alpha_factor=1.7, linear_attn_beta_factor=0.8, mlp_alpha_factor=1.3, mlp_beta_factor=0.9)),
    (["linear_attention"] * 3 + ["full_attention"], 8, 1, 5,
     dict(linear_attn_alpha_factor=2.0, full_attn_beta_factor=1.5, mlp_alpha_factor=2.0)),
]


def hf_minimax(layer_types, heads, kv, block, factors, seed):
    torch.manual_seed(seed)
    cfg = transformers.MiniMaxConfig(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=len(layer_types),
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, layer_types=layer_types, block_size=block, initializer_range=0.2, **factors)
    return perturb_norms(transformers.MiniMaxForCausalLM(cfg).eval())


def hf_m2(seed, rotary_dim=4, kv=2):
    torch.manual_seed(seed)
    cfg = transformers.MiniMaxM2Config(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv, head_dim=8, num_local_experts=6, num_experts_per_tok=3, rotary_dim=rotary_dim,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    model = perturb_norms(transformers.MiniMaxM2ForCausalLM(cfg).eval())
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(torch.randn(6) * 0.5)
    return model


def perturb_norms(model):
    with torch.no_grad():  # norm weights of 1 would hide a missing or misplaced norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


CASES = [("hybrid", i) for i in range(len(HYBRID_CASES))] + [("m2", 0), ("m2", 1)]


def build_hf(kind, i):
    if kind == "hybrid":
        return hf_minimax(*HYBRID_CASES[i], seed=i)
    return hf_m2(seed=10 + i, rotary_dim=(4, 8)[i], kv=(2, 1)[i])


@pytest.mark.parametrize("kind,i", CASES)
def test_logits_match_transformers_both_directions(kind, i, tmp_path):
    hf = build_hf(kind, i)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    x = torch.randint(0, V, (2, 23), generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        ref = hf(x).logits
        assert ref.abs().max() > 1.0  # weights big enough that a mistake shows
        assert max_diff(ours(x), ref) <= 1e-4
    # ours -> transformers: perturb our weights so this is not the same checkpoint coming back
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for block in ours.layers:
            if block.moe.correction_bias is not None:
                block.moe.correction_bias.add_(torch.randn(block.moe.correction_bias.shape) * 0.3)
    save_hf(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_diff(back(x).logits, ours(x)) <= 1e-4


@pytest.mark.parametrize("kind,i", [("hybrid", 1), ("m2", 0)])
def test_left_padding_matches_transformers(kind, i, tmp_path):
    hf = build_hf(kind, i)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    x = torch.randint(3, V, (3, 19), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(x)
    mask[0, :6] = 0
    mask[2, :11] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(x, attention_mask=mask, position_ids=pos).logits
        got = ours(x, attention_mask=mask)  # positions derived from the mask
    real = mask.bool()
    assert max_diff(got[real], ref[real]) <= 1e-4


def test_partial_rope_against_the_definition():
    # RoPE rotates pair (j, j + r/2) of the first r dims by angle pos * theta^(-2j/r); the rest pass
    r, D, theta = 6, 10, 500.0
    x = torch.randn(2, 5, 3, D)
    pos = torch.tensor([[0, 1, 2, 7, 40], [3, 3, 9, 11, 100]])
    cos, sin = rope_cos_sin(pos, r, theta, x.dtype)
    y = apply_rope(x, cos, sin)
    expect = x.clone()
    for j in range(r // 2):
        ang = pos.double() * theta ** (-2 * j / r)
        c, s = ang.cos()[..., None].float(), ang.sin()[..., None].float()
        a, b = x[..., j], x[..., j + r // 2]
        expect[..., j] = a * c - b * s
        expect[..., j + r // 2] = b * c + a * s
    assert max_diff(y, expect) < 1e-5
    assert torch.equal(y[..., r:], x[..., r:])
    # relative: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def dot(m, n):
        cq, sq = rope_cos_sin(torch.tensor([[m]]), r, theta, q.dtype)
        ck, sk = rope_cos_sin(torch.tensor([[n]]), r, theta, k.dtype)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert dot(10, 3) == pytest.approx(dot(107, 100), rel=1e-4)


def test_slopes_follow_minimax():
    # power of two: 2^(-8(h+1)/H); first layer scale 1 + 1e-5; last layer 1e-5
    assert lightning_slopes(8, 0, 4) == pytest.approx([2 ** (-(h + 1)) * (1 + 1e-5) for h in range(8)])
    assert lightning_slopes(8, 3, 4) == pytest.approx([2 ** (-(h + 1)) * 1e-5 for h in range(8)])
    # ALiBi interleaving for H = 6: the 4-head slopes, then every other 8-head slope
    four = [2 ** (-2 * (h + 1)) for h in range(4)]
    eight = [2 ** (-(h + 1)) for h in range(8)]
    assert lightning_slopes(6, 0, 2) == pytest.approx([s * (1 + 1e-5) for s in four + eight[0::2][:2]])


def decode_config(kind):
    if kind == "hybrid":
        return preset("tiny", vocab_size=V, layer_types=("lightning", "softmax", "lightning", "softmax"),
                      block_size=4, initializer_range=0.2)
    return preset("tiny", vocab_size=V, layer_types=("softmax",) * 3, router="sigmoid", qk_norm=True,
                  residual="prenorm", norm_eps=1e-6, initializer_range=0.2)


def decode_model(kind, seed=0):
    torch.manual_seed(seed)
    model = XinzhouLM(decode_config(kind)).eval()
    if kind == "m2":
        for block in model.layers:
            block.moe.correction_bias.copy_(torch.randn(4) * 0.3)
    return model


@pytest.mark.parametrize("kind", ["hybrid", "m2"])
def test_incremental_decoding_reproduces_full_forward(kind):
    model = decode_model(kind)
    B, T, prompt = 3, 21, 9
    x = torch.randint(0, V, (B, T))
    with torch.no_grad():
        full = model(x)
        cache = HybridCache(model.config, B, page_size=4)  # pages of 4: many pages, and pool growth
        steps = [model(x[:, :prompt], cache=cache)]
        for t in range(prompt, T):
            steps.append(model(x[:, t:t + 1], cache=cache))
    inc = torch.cat(steps, dim=1)
    assert full.abs().max() > 1.0
    assert max_diff(inc, full) <= 1e-4
    assert cache.lengths == [T] * B


def test_chunked_prefill_and_slot_reuse():
    model = decode_model("hybrid", seed=1)
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        full = model(x)
        cache = HybridCache(model.config, 2, page_size=8)
        chunks = [model(x[:, a:b], cache=cache) for a, b in ((0, 11), (11, 12), (12, 30))]
        assert max_diff(torch.cat(chunks, 1), full) <= 1e-4
        # a step that writes slot 0 only leaves slot 1's lightning state and keys untouched
        before = {i: s.clone() for i, s in cache.state.items()}
        k_before = {i: t.clone() for i, t in cache.k_pool.items()}
        model(x[:1, :1], cache=cache, slots=[0])
        for i, s in cache.state.items():
            assert torch.equal(s[1], before[i][1]) and not torch.equal(s[0], before[i][0])
        rows1 = [p * 8 + j for p in cache.pages[1] for j in range(8)]
        for i, t in cache.k_pool.items():
            assert torch.equal(t[rows1], k_before[i][rows1])
        assert cache.lengths == [31, 30]
        # slot 0 released and reused for a new prompt: exactly what a fresh cache gives
        cache.release(0)
        assert all(s[0].abs().max() == 0 for s in cache.state.values()) and cache.lengths[0] == 0
        prompt = torch.randint(0, V, (1, 5))
        got = model(prompt, cache=cache, slots=[0])
        fresh = HybridCache(model.config, 1)
        want = model(prompt, cache=fresh)
        assert max_diff(got, want) <= 1e-4
        # and slot 1 still continues its own sequence exactly
        nxt = torch.randint(0, V, (1, 3))
        cont = model(nxt, cache=cache, slots=[1])
        assert max_diff(cont, model(torch.cat([x[1:], nxt], 1))[:, -3:]) <= 1e-4


def test_loss_is_cross_entropy_plus_balance_and_trains():
    torch.manual_seed(2)
    cfg = preset("tiny", vocab_size=V, router_aux_loss_coef=0.01)
    model = XinzhouLM(cfg)
    x = torch.randint(0, V, (2, 16))
    y = torch.randint(0, V, (2, 16))
    y[0, :5] = -100  # ignored (e.g. prompt tokens in SFT)
    loss, ce, aux = model(x, y, return_parts=True)
    logits = model(x)
    ce_ref = torch.nn.functional.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=-100)
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ce.item() + 0.01 * aux.item(), rel=1e-6)
    assert 1.8 < aux.item() < float(cfg.num_experts)  # experts_per_token (2) when perfectly balanced
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.layers[0].moe.gate.weight.grad.abs().sum() > 0  # the router learns through both terms


def test_routing_bias_stays_fp32_and_load_is_counted_in_training_only():
    torch.manual_seed(5)
    model = XinzhouLM(decode_config("m2"))
    bias = torch.randn(4) * 1e-3 + 0.1234567  # not representable in bf16
    model.layers[0].moe.correction_bias.copy_(bias)
    model = model.to(torch.bfloat16)
    moe = model.layers[0].moe
    assert moe.correction_bias.dtype == torch.float32 and torch.equal(moe.correction_bias, bias)
    assert "layers.0.moe.expert_load" not in model.state_dict()  # a running count, not a weight
    x = torch.randint(0, V, (2, 7))
    model.eval()
    with torch.no_grad():
        model(x)
    assert moe.expert_load.sum() == 0
    model.train()
    model(x)
    assert moe.expert_load.sum().item() == 2 * 7 * model.config.experts_per_token


def test_fp32_head_and_router_stay_fp32_under_autocast():
    torch.manual_seed(4)
    model = XinzhouLM(preset("tiny", vocab_size=V, lm_head_fp32=True))
    x = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.float32
    # the head ran in fp32 on bf16-rounded hidden states: close to the fp32 model, not bit-identical
    assert max_diff(out, ref) < 0.05 * ref.abs().max().item()


def test_fp32_head_tied_embeddings_and_bf16():
    torch.manual_seed(3)
    cfg = preset("tiny", vocab_size=V, tie_embeddings=True)
    model = XinzhouLM(cfg)
    assert model.lm_head is None
    x = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        ref = model(x)
        assert ref.dtype == torch.float32
        assert max_diff(ref, model(x)) == 0
        bf = XinzhouLM(cfg.replace(lm_head_fp32=True))
        bf.load_state_dict(model.state_dict())
        bf = bf.to(torch.bfloat16)
        out = bf(x)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert max_diff(out, ref) < 0.1 * ref.abs().max().item()
        # decays stay fp32 even in a bf16 model
        assert bf.layers[0].attn.slopes(torch.device("cpu")).dtype == torch.float32


def test_real_shapes_on_meta_device():
    text01, m2 = preset("text01"), preset("m2")
    with torch.device("meta"):
        model = XinzhouLM(text01)
    assert sum(p.numel() for p in model.parameters()) == text01.num_params()
    assert text01.num_params() / 1e9 == pytest.approx(456, rel=0.01)
    assert text01.num_params(active=True) / 1e9 == pytest.approx(45.9, rel=0.01)
    assert m2.num_params() / 1e9 == pytest.approx(229, rel=0.02)
    assert m2.num_params(active=True) / 1e9 == pytest.approx(10, rel=0.05)
    assert text01.layer_types.count("softmax") == 10 and text01.layer_types[7] == "softmax"
    assert text01.mlp_alpha == pytest.approx(3.5566, abs=1e-4)
    small = preset("small")
    assert small.num_params() / 1e6 == pytest.approx(306.8, abs=0.1)
    assert math.isclose(preset("tiny").mlp_alpha, 8 ** 0.25)


@pytest.mark.parametrize("i", [0, 2])
def test_training_loss_and_gradients_match_transformers(i, tmp_path):
    # the same load-balancing loss (MiniMax's / Mixtral's formula, with the same coefficient) and
    # a pad row that gets no gradient, as the original's padding_idx
    hf = hf_minimax(*HYBRID_CASES[i], seed=i)
    hf.config.router_aux_loss_coef = hf.router_aux_loss_coef = 0.05  # the model keeps its own copy
    hf.config.pad_token_id = 3
    hf.model.embed_tokens.padding_idx = 3
    hf.train()
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).train()
    assert ours.config.pad_token_id == 3 and ours.config.router_aux_loss_coef == 0.05
    x = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(5))
    x[0, 4] = 3  # the pad token appears as an input
    out = hf(input_ids=x, labels=x, output_router_logits=True)
    y = torch.cat([x[:, 1:], torch.full((2, 1), -100)], 1)  # transformers shifts the labels itself
    loss, ce, aux = ours(x, y, return_parts=True)
    assert aux.item() == pytest.approx(out.aux_loss.item(), rel=1e-5)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    out.loss.backward()
    loss.backward()
    ref = dict(hf.named_parameters())
    assert ours.embed.weight.grad[3].abs().max() == 0 and ref["model.embed_tokens.weight"].grad[3].abs().max() == 0
    assert max_diff(ours.embed.weight.grad, ref["model.embed_tokens.weight"].grad) < 1e-5
    g_ref = ref["model.layers.0.mlp.gate.weight"].grad
    assert max_diff(ours.layers[0].moe.gate.weight.grad, g_ref) < 1e-5 * max(1.0, g_ref.abs().max().item())


@pytest.mark.parametrize("pattern", [("lightning", "softmax", "lightning", "softmax"), ("softmax", "softmax")])
def test_segment_ids_compute_each_document_alone(pattern):
    # a packed training window: each document gets the logits (and loss) it gets on its own
    cfg = preset("tiny", vocab_size=97, layer_types=pattern, block_size=8)
    torch.manual_seed(0)
    model = XinzhouLM(cfg).eval()
    lens = [[5, 17, 3, 15], [40]]
    ids = torch.randint(1, 97, (2, 40))
    seg = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in lens])
    with torch.no_grad():
        out = model(ids, segment_ids=seg)
        for b, row in enumerate(lens):
            a = 0
            for n in row:
                alone = model(ids[b:b + 1, a:a + n])
                assert (out[b, a:a + n] - alone[0]).abs().max() < 1e-5
                a += n
        assert (model(ids)[0, 5:] - out[0, 5:]).abs().max() > 1e-3  # unmasked, documents see each other
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids[:1], segment_ids=seg[:1], cu_seqlens=torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="segment_ids must be"):
        model(ids, segment_ids=seg[:, :10])
