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

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xinzhou.atomic import atomic_dir
from xinzhou.config import ModelConfig
from xinzhou.errors import CheckpointError
from xinzhou.model import XinzhouLM

__all__ = ["CheckpointError", "config_from_hf", "config_to_hf", "load_hf", "save_hf", "write_hf"]

HYBRID_TYPES = ("minimax", "minimax_text_01", "minimax_m1")
MODEL_TYPES = (*HYBRID_TYPES, "minimax_m2")
# buffers transformers registers and saves but that are recomputed from the config
DERIVED = re.compile(r"\.(slope_rate|query_decay|key_decay|diagonal_decay|rotary_emb\.inv_freq)$")


# ----------------------------------------------------------------------------- config

_MISSING = object()


def _typed(d: dict, key: str, kind: type, source: str, default: object = _MISSING) -> object:
    """d[key] as kind (int, float or bool), with an error naming the file and field otherwise.
    A field that is absent or null takes the default; without one it is required."""
    v = d.get(key)
    if v is None:
        if default is _MISSING:
            raise CheckpointError(f"{source}: missing field {key!r}" if key not in d else
                                  f"{source}: field {key!r} is null, expected {'an integer' if kind is int else kind.__name__}")
        return default
    if kind is bool:
        ok = isinstance(v, bool)
    elif kind is int:
        ok = (isinstance(v, int) or isinstance(v, float) and v.is_integer()) and not isinstance(v, bool)
    else:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        expected = {int: "an integer", float: "a number", bool: "true or false"}[kind]
        raise CheckpointError(f"{source}: field {key!r} is {v!r}, expected {expected}")
    return kind(v)


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: expected a JSON object of config fields, got a {type(d).__name__}")

    def need(key: str, kind: type = int) -> object:
        return _typed(d, key, kind, source)

    def opt(key: str, default: object, kind: type = int) -> object:
        return _typed(d, key, kind, source, default)

    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not one of {MODEL_TYPES}")
    m2 = model_type == "minimax_m2"
    num_layers = need("num_hidden_layers")
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
    if not isinstance(raw, list):
        raise CheckpointError(f"{source}: field {field!r} is {raw!r}, expected a list of layer types")
    for i, t in enumerate(raw):
        if not isinstance(t, (str, int)) or isinstance(t, bool) or t not in names:
            raise CheckpointError(f"{source}: {field}[{i}] = {t!r} is an unknown layer type "
                                  f"(expected one of {list(names)})")
    layer_types = tuple(names[t] for t in raw[:num_layers])
    if len(layer_types) != num_layers:
        raise CheckpointError(f"{source}: {field} has {len(raw)} entries for num_hidden_layers = {num_layers}")

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    if heads <= 0:
        raise CheckpointError(f"{source}: num_attention_heads = {heads}: must be > 0")
    head_dim = opt("head_dim", hidden // heads)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: rope parameters {rope!r}: expected a JSON object")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    theta = opt("rope_theta", None, float) or _typed(rope, "rope_theta", float, f"{source} rope parameters",
                                                     5e6 if m2 else 1e6)
    if d.get("rotary_dim"):
        rotary_dim = need("rotary_dim")
    else:
        factor = _typed(rope, "partial_rotary_factor", float, f"{source} rope parameters", 1.0)
        rotary_dim = int(head_dim * factor)
    if opt("shared_intermediate_size", 0) > 0:
        raise CheckpointError(f"{source}: shared experts (shared_intermediate_size > 0) are not supported")
    eos = d.get("eos_token_id")
    if isinstance(eos, list) and eos:
        eos = eos[0]
    token_ids = {k: _typed({k: v}, k, int, source, None)
                 for k, v in (("bos_token_id", d.get("bos_token_id")), ("eos_token_id", eos),
                              ("pad_token_id", d.get("pad_token_id")))}
    common = dict(
        vocab_size=need("vocab_size"), hidden_size=hidden, layer_types=layer_types, num_heads=heads,
        num_kv_heads=opt("num_key_value_heads", heads), head_dim=head_dim, rotary_dim=rotary_dim,
        rope_theta=theta, num_experts=need("num_local_experts"),
        experts_per_token=need("num_experts_per_tok"), expert_dim=need("intermediate_size"),
        norm_eps=opt("rms_norm_eps", 1e-6 if m2 else 1e-5, float),
        tie_embeddings=opt("tie_word_embeddings", False, bool),
        router_aux_loss_coef=opt("router_aux_loss_coef", 0.001, float),
        max_position_embeddings=opt("max_position_embeddings", 1 << 20),
        initializer_range=opt("initializer_range", 0.02, float),
        block_size=opt("block_size", 256), **token_ids)
    if m2:
        if d.get("scoring_func", "sigmoid") != "sigmoid":
            raise CheckpointError(f"{source}: scoring_func {d['scoring_func']!r}: MiniMax-M2 routes with 'sigmoid'")
        if d.get("qk_norm_type", "per_layer") != "per_layer":
            raise CheckpointError(f"{source}: qk_norm_type {d['qk_norm_type']!r} is not supported")
        return _build(source, **common, router="sigmoid", qk_norm=opt("use_qk_norm", True, bool), residual="prenorm")
    if d.get("postnorm", True) is not True:
        raise CheckpointError(f"{source}: postnorm = {d['postnorm']!r}: only MiniMax's post-norm layout is supported")

    def factor(new: str, old: str) -> float:
        return opt(new, opt(old, 1.0, float), float)

    return _build(source, 
        **common, router="softmax", residual="deepnorm",
        linear_attn_alpha=factor("linear_attn_alpha_factor", "layernorm_linear_attention_alpha"),
        linear_attn_beta=factor("linear_attn_beta_factor", "layernorm_linear_attention_beta"),
        full_attn_alpha=factor("full_attn_alpha_factor", "layernorm_full_attention_alpha"),
        full_attn_beta=factor("full_attn_beta_factor", "layernorm_full_attention_beta"),
        mlp_alpha=factor("mlp_alpha_factor", "layernorm_mlp_alpha"),
        mlp_beta=factor("mlp_beta_factor", "layernorm_mlp_beta"))


def _build(source: str, **fields: object) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ValueError as e:  # ModelConfig's own checks (a size of 0, heads not divisible, ...)
        raise CheckpointError(f"{source}: {e}") from e


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
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that are not there: {missing}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


@contextlib.contextmanager
def _open_shard(f: Path) -> Iterator:
    """safe_open with an error that names the file (safetensors' own errors do not)."""
    try:
        handle = safe_open(f, framework="pt")
    except Exception as e:  # SafetensorError (header too small, invalid JSON, truncated) or OSError
        raise CheckpointError(f"{f}: not a readable safetensors file ({e}); truncated or damaged?") from e
    with handle as sf:
        yield sf


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
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory" if not path.exists() else
                              f"{path}: is a file; a checkpoint is a directory with config.json and *.safetensors")
    cfg_file = path / "config.json"
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{cfg_file}: not found (is {path} a Hugging Face checkpoint directory?)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
    cfg = config_from_hf(hf_cfg, str(cfg_file))
    try:
        cfg = cfg.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_hf overrides {overrides}: {e}") from e
    quant = hf_cfg.get("quantization_config") or {}
    fp8_block = None
    if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
        fp8_block = quant.get("weight_block_size")
        if not (isinstance(fp8_block, list) and len(fp8_block) == 2 and all(isinstance(b, int) and b > 0
                                                                              for b in fp8_block)):
            raise CheckpointError(f"{cfg_file}: quantization_config.weight_block_size is {fp8_block!r}, "
                                  "expected two positive integers")
    n_mtp = _typed(hf_cfg, "num_mtp_modules", int, str(cfg_file), 0)  # M2 ships 3; inference does not use them

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
        with _open_shard(f) as sf:
            where.update((k, f) for k in sf.keys())

    def expect(key: str, target: torch.Tensor, got: torch.Size | list[int], file: Path) -> None:
        if tuple(got) != tuple(target.shape):
            raise CheckpointError(f"{file.name}: {key} has shape {list(got)}, the model expects {list(target.shape)}")

    unexpected = []
    for f in files:
        with _open_shard(f) as sf:
            for key in sf.keys():
                if DERIVED.search(key) or key.endswith("weight_scale_inv") or _is_mtp(key, cfg.num_layers, n_mtp):
                    continue  # recomputed, consumed with their weight, or multi-token-prediction modules
                shape = sf.get_slice(key).get_shape()

                def read() -> torch.Tensor:
                    try:
                        t = sf.get_tensor(key)
                    except Exception as e:  # data past the end of a truncated file
                        raise CheckpointError(f"{f}: cannot read tensor {key} ({e}); truncated or damaged?") from e
                    if fp8_block and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                        scale_key = key + "_scale_inv"
                        if scale_key not in where:
                            raise CheckpointError(f"{f.name}: fp8 tensor {key} has no {scale_key}")
                        with _open_shard(where[scale_key]) as sf2:
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
    """Write the model as a Hugging Face checkpoint directory, atomically (xinzhou.atomic): into a
    temporary sibling directory, then renamed. An existing path is replaced only when it is a
    checkpoint xinzhou wrote; anything else (a file, a folder with other files) is refused with
    an OutputError and left as it was."""
    path = Path(path)
    with atomic_dir(path, "checkpoint") as tmp:
        write_hf(model.state_dict(), model.config, tmp, max_shard_bytes, dtype)
    return path
