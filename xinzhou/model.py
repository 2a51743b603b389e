"""The xinzhou model: MiniMax-Text-01 / M1 (hybrid lightning + softmax attention) and MiniMax-M2
(all softmax attention) in one file, readable top to bottom.

    model = XinzhouLM(preset("tiny"))
    logits = model(input_ids)                       # [B, T, V] float32
    loss = model(input_ids, targets)                # cross-entropy (+ coef * balance loss)
    cache = HybridCache(model.config, batch_size=B) # then model(chunk, cache=cache) decodes

Shape legend: B batch, T new tokens, S keys (cached + new), C hidden, H query heads,
KV key/value heads, D head dim, E experts, V vocab.
No I/O, no parallelism, no checkpoint names here (hf.py maps names).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xinzhou.cache import HybridCache
from xinzhou.config import ModelConfig
from xinzhou.ops import moe as moe_ops
from xinzhou.ops.cross_entropy import cross_entropy
from xinzhou.ops.lightning import lightning_attention, lightning_decode
from xinzhou.ops.lightning_ref import lightning_step
from xinzhou.ops.norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 whatever the model dtype; one fused Triton pass on CUDA (ops/norm.py)
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, T] -> cos, sin [B, T, 1, rotary_dim] (NeoX layout: frequencies repeated twice)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device).float() / rotary_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, rotary_dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first rotary_dim dims of x [B, T, H, D]; the rest pass through."""
    r = cos.shape[-1]
    if r == 0:
        return x
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    rotated = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)


def lightning_slopes(num_heads: int, layer: int, num_layers: int) -> list[float]:
    """Per-head decay rates: ALiBi slopes 2^(-8(h+1)/H) (ALiBi's interleaving when H is not a power
    of two, as the original model), scaled by depth: (1 - l/(L-1) + 1e-5)."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if math.log2(num_heads).is_integer():
        base = power_of_two(num_heads)
    else:
        p = 2 ** math.floor(math.log2(num_heads))
        base = power_of_two(p) + power_of_two(2 * p)[0::2][: num_heads - p]
    scale = 1.0 - layer / max(num_layers - 1, 1) + 1e-5
    return [s * scale for s in base]


class LightningAttention(nn.Module):
    """Linear attention with per-head decay; constant-size state for decoding."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.H, self.D, self.block_size = layer, cfg.num_heads, cfg.head_dim, cfg.block_size
        hd = cfg.num_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * hd, bias=False)  # rows interleaved per head
        self.output_gate = nn.Linear(cfg.hidden_size, hd, bias=False)
        self.norm = RMSNorm(hd, cfg.lightning_norm_eps)
        self.out_proj = nn.Linear(hd, cfg.hidden_size, bias=False)
        # a plain attribute, not a buffer: decays stay fp32 when the module is cast to bf16
        self.slope_values = lightning_slopes(cfg.num_heads, layer, cfg.num_layers)
        self._slopes: dict[torch.device, torch.Tensor] = {}

    def slopes(self, device: torch.device) -> torch.Tensor:
        if device not in self._slopes:
            self._slopes[device] = torch.tensor(self.slope_values, dtype=torch.float32, device=device)
        return self._slopes[device]

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None,
                cache: HybridCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = F.silu(self.qkv_proj(x))  # [B, T, 3 * H * D]
        if token_mask is not None:
            qkv = qkv * token_mask[:, :, None].to(qkv.dtype)  # padding adds nothing to the state
        q, k, v = qkv.view(B, T, self.H, 3 * self.D).split(self.D, dim=-1)  # [B, T, H, D] each
        slopes = self.slopes(x.device)
        if cache is None:
            o, _ = lightning_attention(q, k, v, slopes, block_size=self.block_size)
        elif T == 1:
            state = cache.state[self.layer]
            if token_mask is None:
                o = lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, state)[:, None]
            else:  # a padded step must leave the slot's state untouched (no decay either)
                o, new = lightning_step(q[:, 0], k[:, 0], v[:, 0], slopes, state)
                state.copy_(torch.where(token_mask[:, 0, None, None, None], new, state))
                o = o[:, None]
        elif token_mask is None or bool(token_mask.all()):
            o, cache.state[self.layer] = lightning_attention(
                q, k, v, slopes, initial_state=cache.state[self.layer], output_final_state=True,
                block_size=self.block_size)
        else:  # padded chunk: run each slot on its real (left-padded) tokens, so padding never decays a state
            state = cache.state[self.layer]
            o = torch.zeros_like(v)
            for b, n in enumerate(token_mask.sum(1).tolist()):
                if n == 0:
                    continue
                if not bool(token_mask[b, T - n:].all()):
                    raise ValueError(f"attention_mask row {b}: padding must be on the left (before every token)")
                o[b:b + 1, T - n:], state[b:b + 1] = lightning_attention(
                    q[b:b + 1, T - n:], k[b:b + 1, T - n:], v[b:b + 1, T - n:], slopes,
                    initial_state=state[b:b + 1], output_final_state=True, block_size=self.block_size)
        o = self.norm(o.reshape(B, T, self.H * self.D))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * o)


class SoftmaxAttention(nn.Module):
    """Causal GQA with partial RoPE and optional qk-norm (M2), computed by torch SDPA."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.H, self.KV, self.D = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.H * self.D, bias=False)
        self.k_proj = nn.Linear(C, self.KV * self.D, bias=False)
        self.v_proj = nn.Linear(C, self.KV * self.D, bias=False)
        self.o_proj = nn.Linear(self.H * self.D, C, bias=False)
        self.q_norm = RMSNorm(self.H * self.D, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.KV * self.D, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: HybridCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:  # over the whole projection, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.view(B, T, self.H, self.D), cos, sin).transpose(1, 2)  # [B, H, T, D]
        k = apply_rope(k.view(B, T, self.KV, self.D), cos, sin).transpose(1, 2)  # [B, KV, T, D]
        v = v.view(B, T, self.KV, self.D).transpose(1, 2)  # [B, KV, T, D]
        if cache is not None:
            k, v = cache.write_kv(self.layer, k, v)  # [B, KV, S, D]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.KV != self.H)  # [B, H, T, D]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.H * self.D))


class MoE(nn.Module):
    """Router + SwiGLU experts (weights fused per expert: w13 = [w1; w3], w2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.k, self.kind, E = cfg.experts_per_token, cfg.router, cfg.num_experts
        self.gate = nn.Linear(cfg.hidden_size, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, 2 * cfg.expert_dim, cfg.hidden_size))
        self.w2 = nn.Parameter(torch.empty(E, cfg.hidden_size, cfg.expert_dim))
        if cfg.router == "sigmoid":  # M2: steers the choice only; nudged toward balance, not trained
            self.register_buffer("correction_bias", torch.zeros(E, dtype=torch.float32))
            # routing slots per expert since the last bias update (train.py reads and resets it)
            self.register_buffer("expert_load", torch.zeros(E, dtype=torch.float32), persistent=False)
        else:
            self.correction_bias = self.expert_load = None
        self.impl = "grouped"  # or "loop": the reference, for parity tests

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        # .to(bf16) must move the routing bias and load counts but keep them fp32
        kept = {n: self._buffers[n] for n in ("correction_bias", "expert_load") if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            self._buffers[name] = new.float() if old.is_meta or new.is_meta else old.to(new.device)
        return out

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        with torch.autocast(x.device.type, enabled=False):  # the router in fp32, as MiniMax does
            logits = F.linear(flat.float(), self.gate.weight.float())
        weights, indices, probs = moe_ops.route(logits, self.k, self.kind, self.correction_bias)
        experts = moe_ops.experts_grouped if self.impl == "grouped" else moe_ops.experts_loop
        y = experts(flat, self.w13, self.w2, weights, indices)
        mask = None if token_mask is None else token_mask.reshape(-1)
        stats = moe_ops.balance_stats(probs, indices, self.gate.out_features, mask)
        if self.training and self.expert_load is not None:
            self.expert_load += stats[0].detach()
        return y.view(B, T, C), stats


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.kind = cfg.layer_types[layer]
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = LightningAttention(cfg, layer) if self.kind == "lightning" else SoftmaxAttention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.moe = MoE(cfg)
        self.prenorm = cfg.residual == "prenorm"
        lightning = self.kind == "lightning"
        self.attn_alpha = cfg.linear_attn_alpha if lightning else cfg.full_attn_alpha
        self.attn_beta = cfg.linear_attn_beta if lightning else cfg.full_attn_beta
        self.mlp_alpha, self.mlp_beta = cfg.mlp_alpha, cfg.mlp_beta

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                token_mask: torch.Tensor | None, cache: HybridCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.attn_norm(x)
        a = self.attn(h, token_mask, cache) if self.kind == "lightning" else self.attn(h, cos, sin, mask, cache)
        if self.prenorm:  # M2: x + Attn(LN(x)), x + MoE(LN(x))
            x = x + a
            m, stats = self.moe(self.mlp_norm(x), token_mask)
            return x + m, stats
        # post-norm DeepNorm (MiniMax-01/M1): the residual is the normed input, scaled by alpha
        x = _scaled_sum(h, self.attn_alpha, a, self.attn_beta)
        h = self.mlp_norm(x)
        m, stats = self.moe(h, token_mask)
        return _scaled_sum(h, self.mlp_alpha, m, self.mlp_beta), stats


def _scaled_sum(x: torch.Tensor, alpha: float, y: torch.Tensor, beta: float) -> torch.Tensor:
    """alpha * x + beta * y in one kernel when alpha is 1 (two otherwise), not three."""
    return torch.add(x if alpha == 1.0 else alpha * x, y, alpha=beta)


def attention_mask_for(token_mask: torch.Tensor | None, cache: HybridCache | None, T: int,
                       device: torch.device) -> torch.Tensor | None:
    """Boolean SDPA mask [B, 1, T, S] (True = attend), or None for the plain causal fast path.
    A query always sees itself, so padded rows stay finite."""
    start = 0 if cache is None else cache.length
    if token_mask is None and start == 0:
        return None
    S = start + T
    q_pos = start + torch.arange(T, device=device)
    k_pos = torch.arange(S, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    valid = cache.valid[:, :S] if cache is not None else token_mask.bool()  # [B, S]
    return ((causal[None] & valid[:, None, :]) | (k_pos[None, :] == q_pos[:, None])[None])[:, None]


class XinzhouLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                nn.init.normal_(module.w13, std=std)
                nn.init.normal_(module.w2, std=std)
                if module.correction_bias is not None:
                    module.correction_bias.zero_()

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: HybridCache | None = None, return_parts: bool = False, last_logits_only: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = left padding); position_ids [B, T].
        Without targets: float32 logits [B, T, V] ([B, 1, V] with last_logits_only). With targets
        [B, T] (-100 = ignore): the loss CE + router_aux_loss_coef * balance loss, or (loss, ce, aux)
        with return_parts."""
        cfg = self.config
        B, T = input_ids.shape
        token_mask = None if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            base = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device) if cache is None else cache.pos[:, None]
            if token_mask is None:
                position_ids = base + torch.arange(T, device=input_ids.device)
            else:
                position_ids = base + (token_mask.long().cumsum(1) - 1).clamp(min=0)
        if cache is not None:
            cache.reserve(T)
            cache.valid[:, cache.length:cache.length + T] = True if token_mask is None else token_mask
        mask = attention_mask_for(token_mask, cache, T, input_ids.device)

        x = self.embed(input_ids)  # [B, T, C]
        cos, sin = rope_cos_sin(position_ids, cfg.rotary_dim, cfg.rope_theta, x.dtype)
        stats = []
        for block in self.layers:
            x, s = block(x, cos, sin, mask, token_mask, cache)
            stats.append(s)
        x = self.norm(x)
        if cache is not None:
            cache.length += T
            cache.pos += T if token_mask is None else token_mask.long().sum(1)

        if last_logits_only:  # prefill: only the next token's distribution is needed
            x = x[:, -1:]
        w = self.head_weight()
        if cfg.lm_head_fp32:  # outside autocast, or it would run in bf16 anyway
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.float(), w.float())  # [B, T, V]
        else:
            logits = F.linear(x, w)  # [B, T, V]
        if targets is None:
            return logits.float()
        # from the head's dtype: the fused kernel on CUDA reads bf16 logits once (no fp32 copy)
        ce = cross_entropy(logits.view(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-100)
        aux = moe_ops.balance_loss(torch.stack(stats).sum(0), cfg.experts_per_token)
        loss = ce + cfg.router_aux_loss_coef * aux
        return (loss, ce, aux) if return_parts else loss
