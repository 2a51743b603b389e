"""Hugging Face checkpoint interop: config mapping both ways, both weight namings, streamed shards.

    model = load_hf("path/to/MiniMax-Text-01", dtype=torch.bfloat16)
    save_hf(model, "out/ckpt")   # transformers.AutoModelForCausalLM.from_pretrained("out/ckpt") loads it

Reads model types `minimax`, `minimax_text_01`, `minimax_m1` (hybrid) and `minimax_m2`, in MiniMax's
original naming (`block_sparse_moe.experts.{e}.w1/w2/w3`, `attn_type_list`) or transformers 5.x
naming (`mlp.experts.gate_up_proj/down_proj`, `layer_types`). Writes the original naming, which is
what transformers' `save_pretrained` writes and vLLM/SGLang read. Block-FP8 weights (M2's release:
`weight_scale_inv`, 128x128 blocks) are dequantised on load; its multi-token-prediction modules
(`num_mtp_modules`, stored as extra layers) are not loaded. Shards are read one tensor at a time
straight into the model's parameters, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xinzhou.config import ModelConfig
from xinzhou.model import XinzhouLM

HYBRID_TYPES = ("minimax", "minimax_text_01", "minimax_m1")
MODEL_TYPES = (*HYBRID_TYPES, "minimax_m2")
# buffers transformers registers and saves but that are recomputed from the config
DERIVED = re.compile(r"\.(slope_rate|query_decay|key_decay|diagonal_decay|rotary_emb\.inv_freq)$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the file, key and shapes."""


# ----------------------------------------------------------------------------- config

def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    def need(key: str) -> object:
        if key not in d:
            raise CheckpointError(f"{source}: missing field {key!r}")
        return d[key]

    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not one of {MODEL_TYPES}")
    m2 = model_type == "minimax_m2"
    num_layers = int(need("num_hidden_layers"))
    if "layer_types" in d:
        names = {"linear_attention": "lightning", "full_attention": "softmax"}
        raw, field = d["layer_types"], "layer_types"
    elif "attn_type_list" in d:
        names = {0: "lightning", 1: "softmax"}
        raw, field = d["attn_type_list"], "attn_type_list"
    elif m2:
        names, raw, field = {"full_attention": "softmax"}, ["full_attention"] * num_layers, "layer_types"
    else:
        raise CheckpointError(f"{source}: neither 'layer_types' nor 'attn_type_list' says which layers are linear")
    for i, t in enumerate(raw):
        if t not in names:
            raise CheckpointError(f"{source}: {field}[{i}] = {t!r} is an unknown layer type "
                                  f"(expected one of {list(names)})")
    layer_types = tuple(names[t] for t in raw[:num_layers])
    if len(layer_types) != num_layers:
        raise CheckpointError(f"{source}: {field} has {len(raw)} entries for num_hidden_layers = {num_layers}")

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = int(d.get("head_dim") or hidden // heads)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    theta = float(d.get("rope_theta") or rope.get("rope_theta") or (5e6 if m2 else 1e6))
    if d.get("rotary_dim"):
        rotary_dim = int(d["rotary_dim"])
    else:
        rotary_dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    if int(d.get("shared_intermediate_size") or 0) > 0:
        raise CheckpointError(f"{source}: shared experts (shared_intermediate_size > 0) are not supported")
    eos = d.get("eos_token_id")
    common = dict(
        vocab_size=int(need("vocab_size")), hidden_size=hidden, layer_types=layer_types, num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=head_dim, rotary_dim=rotary_dim,
        rope_theta=theta, num_experts=int(need("num_local_experts")),
        experts_per_token=int(need("num_experts_per_tok")), expert_dim=int(need("intermediate_size")),
        norm_eps=float(d.get("rms_norm_eps", 1e-6 if m2 else 1e-5)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
        max_position_embeddings=int(d.get("max_position_embeddings", 1 << 20)),
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=d.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"), block_size=int(d.get("block_size", 256)))
    if m2:
        if d.get("scoring_func", "sigmoid") != "sigmoid":
            raise CheckpointError(f"{source}: scoring_func {d['scoring_func']!r}: MiniMax-M2 routes with 'sigmoid'")
        if d.get("qk_norm_type", "per_layer") != "per_layer":
            raise CheckpointError(f"{source}: qk_norm_type {d['qk_norm_type']!r} is not supported")
        return ModelConfig(**common, router="sigmoid", qk_norm=bool(d.get("use_qk_norm", True)), residual="prenorm")
    if d.get("postnorm", True) is not True:
        raise CheckpointError(f"{source}: postnorm = {d['postnorm']!r}: only MiniMax's post-norm layout is supported")

    def factor(new: str, old: str) -> float:
        return float(d.get(new, d.get(old, 1.0)))

    return ModelConfig(
        **common, router="softmax", residual="deepnorm",
        linear_attn_alpha=factor("linear_attn_alpha_factor", "layernorm_linear_attention_alpha"),
        linear_attn_beta=factor("linear_attn_beta_factor", "layernorm_linear_attention_beta"),
        full_attn_alpha=factor("full_attn_alpha_factor", "layernorm_full_attention_alpha"),
        full_attn_beta=factor("full_attn_beta_factor", "layernorm_full_attention_beta"),
        mlp_alpha=factor("mlp_alpha_factor", "layernorm_mlp_alpha"),
        mlp_beta=factor("mlp_beta_factor", "layernorm_mlp_beta"))


def config_to_hf(cfg: ModelConfig) -> dict:
    """The transformers config.json for cfg (MiniMaxForCausalLM or MiniMaxM2ForCausalLM)."""
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.expert_dim, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, router_aux_loss_coef=cfg.router_aux_loss_coef,
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        rotary_dim=cfg.rotary_dim, use_cache=True)
    all_softmax = all(t == "softmax" for t in cfg.layer_types)
    if all_softmax and cfg.router == "sigmoid" and cfg.residual == "prenorm" and cfg.qk_norm:
        return dict(architectures=["MiniMaxM2ForCausalLM"], model_type="minimax_m2", **common,
                    rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta,
                                         partial_rotary_factor=cfg.rotary_dim / cfg.head_dim))
    if cfg.router == "softmax" and cfg.residual == "deepnorm" and not cfg.qk_norm:
        # transformers' MiniMax rotates the whole head; `rotary_dim` keeps the original semantics
        return dict(architectures=["MiniMaxForCausalLM"], model_type="minimax", **common,
                    layer_types=["linear_attention" if t == "lightning" else "full_attention" for t in cfg.layer_types],
                    block_size=cfg.block_size, rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
                    linear_attn_alpha_factor=cfg.linear_attn_alpha, linear_attn_beta_factor=cfg.linear_attn_beta,
                    full_attn_alpha_factor=cfg.full_attn_alpha, full_attn_beta_factor=cfg.full_attn_beta,
                    mlp_alpha_factor=cfg.mlp_alpha, mlp_beta_factor=cfg.mlp_beta)
    raise CheckpointError(
        f"no Hugging Face model type has router={cfg.router!r}, residual={cfg.residual!r}, qk_norm={cfg.qk_norm} "
        f"with layer types {sorted(set(cfg.layer_types))}: MiniMax-01/M1 is softmax+deepnorm, M2 is "
        "all-softmax+sigmoid+prenorm+qk_norm")


# ----------------------------------------------------------------------------- names

def _layer_names(cfg: ModelConfig, i: int) -> Iterator[tuple[str, str]]:
    """(xinzhou name, checkpoint name) for the plain one-to-one tensors of layer i."""
    p, q = f"layers.{i}.", f"model.layers.{i}."
    yield p + "attn_norm.weight", q + "input_layernorm.weight"
    yield p + "mlp_norm.weight", q + "post_attention_layernorm.weight"
    if cfg.layer_types[i] == "lightning":
        for n in ("qkv_proj", "output_gate", "norm", "out_proj"):
            yield f"{p}attn.{n}.weight", f"{q}self_attn.{n}.weight"
    else:
        for n in ("q_proj", "k_proj", "v_proj", "o_proj") + (("q_norm", "k_norm") if cfg.qk_norm else ()):
            yield f"{p}attn.{n}.weight", f"{q}self_attn.{n}.weight"
    yield p + "moe.gate.weight", q + "block_sparse_moe.gate.weight"
    if cfg.router == "sigmoid":
        yield p + "moe.correction_bias", q + "block_sparse_moe.e_score_correction_bias"


def _plain_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        names.update({ckpt: ours for ours, ckpt in _layer_names(cfg, i)})
    return names


EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def _canonical(key: str) -> str:
    # transformers 5.x renames block_sparse_moe -> mlp for the gate and the correction bias
    return re.sub(r"\.mlp\.(gate\.weight|e_score_correction_bias)$", r".block_sparse_moe.\1", key)


# ----------------------------------------------------------------------------- load

LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def _is_mtp(key: str, num_layers: int, n_mtp: int) -> bool:
    """Multi-token-prediction modules declared by `num_mtp_modules`: stored as layers
    [num_layers, num_layers + n_mtp) (as vLLM and SGLang read them)."""
    m = LAYER_KEY.match(key)
    return m is not None and num_layers <= int(m[1]) < num_layers + n_mtp

def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that are not there: {missing}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """Block-FP8 -> fp32: each [b0, b1] block of w is multiplied by its scale."""
    rows, cols = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w.float() * s


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            **overrides: object) -> XinzhouLM:
    """Build an XinzhouLM from a Hugging Face checkpoint directory. `overrides` replace config
    fields that are runtime choices (e.g. lm_head_fp32=True)."""
    path = Path(path)
    cfg_file = path / "config.json"
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{cfg_file}: not found (is {path} a Hugging Face checkpoint directory?)") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
    cfg = config_from_hf(hf_cfg, str(cfg_file)).replace(**overrides)
    quant = hf_cfg.get("quantization_config") or {}
    fp8_block = quant.get("weight_block_size") if quant.get("quant_method") == "fp8" else None
    n_mtp = int(hf_cfg.get("num_mtp_modules") or 0)  # M2 ships 3; inference does not use them

    with torch.device("meta"):
        model = XinzhouLM(cfg)
    model = model.to(dtype).to_empty(device=device)  # the routing bias stays fp32 (MoE._apply)
    for block in model.layers:
        if block.moe.expert_load is not None:  # not in checkpoints: a running count, starts at zero
            block.moe.expert_load.zero_()
    params = model.state_dict(keep_vars=True)  # parameters and persistent buffers, by our names
    plain = _plain_names(cfg)
    filled: dict[str, torch.Tensor] = {name: torch.zeros(t.shape[0] if name.endswith(("w13", "w2")) else 1,
                                                         2 if name.endswith("w13") else 1, dtype=torch.bool)
                                       for name, t in params.items()}
    files = _shard_files(path)
    where = {}  # key -> file, for scales stored in another shard
    for f in files:
        with safe_open(f, framework="pt") as sf:
            where.update((k, f) for k in sf.keys())

    def expect(key: str, target: torch.Tensor, got: torch.Size | list[int], file: Path) -> None:
        if tuple(got) != tuple(target.shape):
            raise CheckpointError(f"{file.name}: {key} has shape {list(got)}, the model expects {list(target.shape)}")

    unexpected = []
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():
                if DERIVED.search(key) or key.endswith("weight_scale_inv") or _is_mtp(key, cfg.num_layers, n_mtp):
                    continue  # recomputed, consumed with their weight, or multi-token-prediction modules
                shape = sf.get_slice(key).get_shape()

                def read() -> torch.Tensor:
                    t = sf.get_tensor(key)
                    if fp8_block and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                        scale_key = key + "_scale_inv"
                        if scale_key not in where:
                            raise CheckpointError(f"{f.name}: fp8 tensor {key} has no {scale_key}")
                        with safe_open(where[scale_key], framework="pt") as sf2:
                            t = _dequant_fp8(t, sf2.get_tensor(scale_key), fp8_block)
                    return t

                name = plain.get(_canonical(key))
                if name is not None:
                    expect(key, params[name], shape, f)
                    with torch.no_grad():
                        params[name].copy_(read())
                    filled[name][:] = True
                elif m := EXPERT.fullmatch(key):
                    layer, e, w = int(m[1]), int(m[2]), m[3]
                    if layer >= cfg.num_layers or e >= cfg.num_experts:
                        unexpected.append(f"{key} {list(shape)}")
                        continue
                    name = f"layers.{layer}.moe.{'w2' if w == 'w2' else 'w13'}"
                    F = cfg.expert_dim
                    target = params[name][e] if w == "w2" else params[name][e, (0 if w == "w1" else F):][:F]
                    expect(key, target, shape, f)
                    with torch.no_grad():
                        target.copy_(read())
                    filled[name][e, 0 if w != "w3" else 1] = True
                elif m := FUSED.fullmatch(key):
                    layer = int(m[1])
                    if layer >= cfg.num_layers:
                        unexpected.append(f"{key} {list(shape)}")
                        continue
                    name = f"layers.{layer}.moe.{'w13' if m[2] == 'gate_up_proj' else 'w2'}"
                    expect(key, params[name], shape, f)
                    with torch.no_grad():
                        params[name].copy_(read())
                    filled[name][:] = True
                else:
                    unexpected.append(f"{key} {list(shape)}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} tensor(s) the {hf_cfg['model_type']} model has no place for: "
                              + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
    ckpt_name = {ours: ckpt for ckpt, ours in plain.items()}
    missing = []
    for name, mask in filled.items():
        if not mask.all():
            label = ckpt_name.get(name, name)
            if name.endswith(("w13", "w2")):
                bad = sorted({int(e) for e in (~mask).nonzero()[:, 0]})
                label = f"layer {name.split('.')[1]} experts {bad[:8]} ({name.rsplit('.', 1)[1]}: {list(params[name].shape)})"
            else:
                label += f" {list(params[name].shape)}"
            missing.append(label)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint: "
                              + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    return model


# ----------------------------------------------------------------------------- save

def _checkpoint_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) in the original naming, experts split per expert."""
    for ckpt, ours in _plain_names(cfg).items():
        yield ckpt, state[ours]
    F = cfg.expert_dim
    for i in range(cfg.num_layers):
        w13, w2 = state[f"layers.{i}.moe.w13"], state[f"layers.{i}.moe.w2"]
        for e in range(cfg.num_experts):
            p = f"model.layers.{i}.block_sparse_moe.experts.{e}."
            yield p + "w1.weight", w13[e, :F]
            yield p + "w2.weight", w2[e]
            yield p + "w3.weight", w13[e, F:]


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished tmp directory to path; an existing path is replaced only after tmp is complete."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def write_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, max_shard_bytes: int = 4 << 30,
             dtype: torch.dtype | None = None) -> None:
    """Write config.json + safetensors shards (+ index when sharded) of a model state dict into the
    directory out (use save_hf for an atomic write)."""
    hf_cfg = config_to_hf(cfg)
    out = Path(out)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in _checkpoint_tensors(state, cfg):
        nbytes = t.numel() * (t.element_size() if dtype is None or name.endswith("bias") else dtype.itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, t in shard.items():
            t = t.detach()
            if dtype is not None and t.is_floating_point() and not name.endswith("bias"):
                t = t.to(dtype)
            tensors[name] = t.to("cpu").contiguous().clone()
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, out / fname, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    first = next(iter(state.values()))
    hf_cfg["dtype"] = str(dtype or first.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")


def save_hf(model: XinzhouLM, path: str | os.PathLike, max_shard_bytes: int = 4 << 30,
            dtype: torch.dtype | None = None) -> Path:
    """Write the model as a Hugging Face checkpoint directory, atomically: everything goes to a
    temporary sibling directory first, then one rename (an existing directory is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_hf(model.state_dict(), model.config, tmp, max_shard_bytes, dtype)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
