"""Checkpoint interop: both namings, original configs, shards, FP8, and errors that name the problem."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xinzhou.config import preset
from xinzhou.hf import CheckpointError, config_from_hf, config_to_hf, load_hf, save_hf
from xinzhou.model import XinzhouLM

V = 67


def tiny(**kw):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=V, hidden_size=32, expert_dim=24, initializer_range=0.2, **kw)
    return XinzhouLM(cfg).eval()


def m2_tiny():
    # prenorm ignores the DeepNorm factors and all-softmax has no lightning blocks: keep defaults
    model = tiny(layer_types=("softmax", "softmax"), router="sigmoid", qk_norm=True, residual="prenorm",
                 linear_attn_alpha=1.0, full_attn_alpha=1.0, mlp_alpha=1.0, block_size=256)
    with torch.no_grad():
        for b in model.layers:
            b.moe.correction_bias.copy_(torch.randn(4))
    return model


def logits(model, seed=0):
    x = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("make", [tiny, m2_tiny])
def test_sharded_round_trip(make, tmp_path):
    model = make()
    save_hf(model, tmp_path / "ck", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 3
    back = load_hf(tmp_path / "ck")
    assert back.config == model.config
    assert torch.equal(logits(back), logits(model))
    if model.config.router == "sigmoid":
        assert back.layers[0].moe.correction_bias.dtype == torch.float32


def test_transformers_fused_naming_loads(tmp_path):
    # transformers 5.x in-memory names: mlp.gate, mlp.experts.gate_up_proj / down_proj
    model = m2_tiny()
    save_hf(model, tmp_path / "orig")
    state = load_file(tmp_path / "orig" / "model.safetensors")
    fused = {}
    F = model.config.expert_dim
    for i in range(model.config.num_layers):
        p = f"model.layers.{i}.block_sparse_moe."
        E = model.config.num_experts
        w1 = torch.stack([state.pop(f"{p}experts.{e}.w1.weight") for e in range(E)])
        w3 = torch.stack([state.pop(f"{p}experts.{e}.w3.weight") for e in range(E)])
        w2 = torch.stack([state.pop(f"{p}experts.{e}.w2.weight") for e in range(E)])
        assert w1.shape[1] == F
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = w2
        fused[f"model.layers.{i}.mlp.gate.weight"] = state.pop(p + "gate.weight")
        fused[f"model.layers.{i}.mlp.e_score_correction_bias"] = state.pop(p + "e_score_correction_bias")
    fused.update(state)
    (tmp_path / "fused").mkdir()
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "orig" / "config.json").read_text())
    assert torch.equal(logits(load_hf(tmp_path / "fused")), logits(model))


def test_original_minimax_text01_config():
    # the released MiniMax-Text-01 / M1 config.json style
    d = {"model_type": "minimax_text_01", "architectures": ["MiniMaxText01ForCausalLM"], "vocab_size": 200064,
         "hidden_size": 6144, "num_hidden_layers": 8, "num_attention_heads": 64, "num_key_value_heads": 8,
         "head_dim": 128, "rotary_dim": 64, "rope_theta": 10000000, "attn_type_list": [0] * 7 + [1],
         "num_local_experts": 32, "num_experts_per_tok": 2, "intermediate_size": 9216, "postnorm": True,
         "layernorm_full_attention_alpha": 3.5565588200778455, "layernorm_full_attention_beta": 1.0,
         "layernorm_linear_attention_alpha": 3.5565588200778455, "layernorm_linear_attention_beta": 1.0,
         "layernorm_mlp_alpha": 3.5565588200778455, "layernorm_mlp_beta": 1.0, "rms_norm_eps": 1e-05,
         "block_size": 256, "shared_intermediate_size": 0}
    cfg = config_from_hf(d)
    assert cfg.layer_types == ("lightning",) * 7 + ("softmax",)
    assert (cfg.rotary_dim, cfg.rope_theta, cfg.mlp_alpha, cfg.router) == (64, 1e7, pytest.approx(3.55656), "softmax")
    back = config_from_hf(config_to_hf(cfg))
    assert back == cfg  # our own config.json keeps every field of the original
    m2 = config_from_hf({"model_type": "minimax_m2", "vocab_size": 200064, "hidden_size": 3072,
                         "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8,
                         "head_dim": 128, "rotary_dim": 64, "rope_theta": 5000000, "num_local_experts": 256,
                         "num_experts_per_tok": 8, "intermediate_size": 1536, "use_qk_norm": True,
                         "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "rms_norm_eps": 1e-06})
    assert m2 == preset("m2").replace(bos_token_id=None, eos_token_id=None, max_position_embeddings=1 << 20)


def test_declared_mtp_layers_are_skipped_and_undeclared_extra_layers_are_not(tmp_path):
    model = m2_tiny()  # 2 layers; M2 stores its MTP modules as layers 2, 3, ...
    save_hf(model, tmp_path / "ck")
    state = load_file(tmp_path / "ck" / "model.safetensors")
    state["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    save_file(state, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no place for.*model\.layers\.2\.self_attn\.q_proj\.weight"):
        load_hf(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg | {"num_mtp_modules": 1}))
    assert torch.equal(logits(load_hf(tmp_path / "ck")), logits(model))


def test_fp8_block_checkpoint_is_dequantised(tmp_path):
    model = m2_tiny()
    save_hf(model, tmp_path / "ck")
    state = load_file(tmp_path / "ck" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"  # [64, 32]
    w = state[key]
    scale = torch.tensor([[0.5, 2.0], [0.25, 4.0]]).repeat_interleave(2, 0)[:4]  # blocks of 16 x 16
    block = [16, 16]
    expanded = scale.repeat_interleave(16, 0).repeat_interleave(16, 1)
    q = (w / expanded).to(torch.float8_e4m3fn)
    state[key] = q
    state[key + "_scale_inv"] = scale
    save_file(state, tmp_path / "ck" / "model.safetensors")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": block, "fmt": "float8_e4m3fn"}
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    loaded = load_hf(tmp_path / "ck")
    got = loaded.layers[0].attn.q_proj.weight
    assert torch.equal(got, q.float() * expanded)
    assert (got - w).abs().max() < 0.15 * w.abs().max()  # fp8 keeps ~2 significant digits


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("model.layers.1.self_attn.q_proj.weight"), r"missing.*model\.layers\.1\.self_attn\.q_proj\.weight \[64, 32\]"),
    (lambda s: s.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"), r"missing.*layer 0 experts \[2\]"),
    (lambda s: s.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3)}), r"no place for.*self_attn\.extra\.weight \[3\]"),
    (lambda s: s.update({"model.layers.0.self_attn.out_proj.weight": torch.zeros(32, 63)}),
     r"out_proj\.weight has shape \[32, 63\], the model expects \[32, 64\]"),
    (lambda s: s.update({"model.layers.0.block_sparse_moe.experts.9.w1.weight": torch.zeros(24, 32)}),
     r"no place for.*experts\.9\.w1\.weight"),
])
def test_bad_checkpoints_name_the_key_and_shapes(edit, message, tmp_path):
    model = tiny(layer_types=("lightning", "softmax"))
    save_hf(model, tmp_path / "ck")
    state = load_file(tmp_path / "ck" / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_hf(tmp_path / "ck")


def test_bad_configs_name_the_field(tmp_path):
    model = tiny(layer_types=("lightning", "softmax"))
    save_hf(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    for change, message in [({"layer_types": ["linear_attention", "sliding_attention"]}, r"layer_types\[1\] = 'sliding_attention'"),
                            ({"model_type": "llama"}, "model_type 'llama'"),
                            ({"layer_types": ["linear_attention"]}, "1 entries for num_hidden_layers = 2")]:
        (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg | change))
        with pytest.raises(CheckpointError, match=message):
            load_hf(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_hf(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="nowhere: no such checkpoint directory"):
        load_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": "sixty-four"}, r"config\.json: field 'hidden_size' is 'sixty-four', expected an integer"),
    ({"vocab_size": None}, r"config\.json: field 'vocab_size' is null, expected an integer"),
    ({"num_local_experts": 2.5}, r"field 'num_local_experts' is 2\.5, expected an integer"),
    ({"rms_norm_eps": "small"}, r"field 'rms_norm_eps' is 'small', expected a number"),
    ({"tie_word_embeddings": "no"}, r"field 'tie_word_embeddings' is 'no', expected true or false"),
    ({"layer_types": "linear_attention"}, r"field 'layer_types' is 'linear_attention', expected a list"),
    ({"hidden_size": 0}, r"config\.json: hidden_size = 0: must be > 0"),
    ({"eos_token_id": "eos"}, r"field 'eos_token_id' is 'eos', expected an integer"),
])
def test_wrong_typed_config_fields_name_file_and_field(change, message, tmp_path):
    save_hf(tiny(layer_types=("lightning", "softmax")), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(CheckpointError, match=message):
        load_hf(tmp_path / "ck")


def test_config_that_is_not_an_object(tmp_path):
    save_hf(tiny(), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object of config fields, got a list"):
        load_hf(tmp_path / "ck")


@pytest.mark.parametrize("cut", [0, 5, 200, -10])
def test_truncated_or_empty_safetensors_names_the_file(cut, tmp_path):
    save_hf(tiny(), tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: (not a readable safetensors file|cannot read tensor)"):
        load_hf(tmp_path / "ck")


def test_save_refuses_folders_it_did_not_write(tmp_path):
    from xinzhou.errors import OutputError

    model = tiny()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match=r"mine: is not a checkpoint directory written by xinzhou \(it holds notes\.txt\)"):
        save_hf(model, mine)
    assert (mine / "notes.txt").read_text() == "precious"
    afile = tmp_path / "weights"
    afile.write_text("not a folder")
    with pytest.raises(OutputError, match="weights: exists and is a file"):
        save_hf(model, afile)
    assert afile.read_text() == "not a folder"
    # a checkpoint of ours is replaced, but not once someone has put other files into it
    save_hf(model, tmp_path / "ck")
    save_hf(model, tmp_path / "ck")
    (tmp_path / "ck" / "README.md").write_text("my notes")
    with pytest.raises(OutputError, match=r"ck: holds files xinzhou did not write there \(README\.md\)"):
        save_hf(model, tmp_path / "ck")
    assert (tmp_path / "ck" / "README.md").exists() and (tmp_path / "ck" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "mine", "weights"]  # no temporaries


def test_save_is_atomic(tmp_path, monkeypatch):
    model = tiny()
    save_hf(model, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    import xinzhou.hf as hf

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left behind
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()
