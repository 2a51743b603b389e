"""The xinzhou model: MiniMax-Text-01 / M1 (hybrid lightning + softmax attention) and MiniMax-M2
(all softmax attention) in one file, readable top to bottom.

    model = XinzhouLM(preset("tiny"))
    logits = model(input_ids)                       # [B, T, V] float32
    loss = model(input_ids, targets)                # cross-entropy (+ coef * balance loss)
    logits = model(packed, cu_seqlens=cu)           # [1, total] packed sequences, each on its own
    loss = model(windows, targets, segment_ids=seg) # training rows of several documents, each on its own
    cache = HybridCache(model.config, num_slots=B)  # then model(chunk, cache=cache) continues row b in slot b

Shape legend: B batch, T new tokens, S keys (cached + new), C hidden, H query heads,
KV key/value heads, D head dim, E experts, V vocab; packed: N sequences, Tm the longest.
No I/O, no parallelism, no checkpoint names here (hf.py maps names).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xinzhou.cache import HybridCache, Packing
from xinzhou.config import ModelConfig
from xinzhou.ops import moe as moe_ops
from xinzhou.ops.cross_entropy import cross_entropy
from xinzhou.ops.lightning import lightning_attention, segment_starts
from xinzhou.ops.lightning_ref import check_cu_seqlens
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
    return rotated if rest.shape[-1] == 0 else torch.cat([rotated, rest], dim=-1)


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
                packing: Packing | None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = F.silu(self.qkv_proj(x))  # [B, T, 3 * H * D]
        if token_mask is not None:  # left padding comes first: zeros add nothing to a zero state
            qkv = qkv * token_mask[:, :, None].to(qkv.dtype)
        q, k, v = qkv.view(B, T, self.H, 3 * self.D).split(self.D, dim=-1)  # [B, T, H, D] each
        slopes = self.slopes(x.device)
        if packing is None:
            o, _ = lightning_attention(q, k, v, slopes, block_size=self.block_size, segment_ids=segment_ids)
        elif packing.decode_only:  # one token per slot: the pool's states stepped in place
            o = packing.decode_in_place(self.layer, q[0], k[0], v[0], slopes)[None]
        else:  # B = 1 packed: each sequence continues from its own state (its slot's, or zero)
            o, state = lightning_attention(
                q, k, v, slopes, initial_state=packing.lightning_state(self.layer),
                output_final_state=packing.cache is not None, cu_seqlens=packing.cu_seqlens,
                block_size=self.block_size)
            packing.store_lightning_state(self.layer, state)
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
                packing: Packing | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:  # over the whole projection, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.view(B, T, self.H, self.D), cos, sin)  # [B, T, H, D]
        k = apply_rope(k.view(B, T, self.KV, self.D), cos, sin)  # [B, T, KV, D]
        v = v.view(B, T, self.KV, self.D)  # [B, T, KV, D]
        gqa = self.KV != self.H
        if packing is None:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=gqa).transpose(1, 2)  # [B, T, H, D]
        else:  # B = 1 packed: each sequence on its own row of a padded [N, Tm] view, cached keys first
            k, v = packing.keys_values(self.layer, k, v)  # [N, KV, S, D]
            o = packing.attend(q, k, v, gqa)  # [1, total, H, D]
        return self.o_proj(o.reshape(B, T, self.H * self.D))


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
                token_mask: torch.Tensor | None, packing: Packing | None,
                segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.attn_norm(x)
        a = (self.attn(h, token_mask, packing, segment_ids) if self.kind == "lightning"
             else self.attn(h, cos, sin, mask, packing))
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


def padding_mask(token_mask: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
    """Boolean SDPA mask [B, 1, T, T] (True = attend) for a left-padded batch, or None for the plain
    causal fast path. A query always sees itself, so padded rows stay finite."""
    if token_mask is None:
        return None
    pos = torch.arange(T, device=device)
    causal = pos[None, :] <= pos[:, None]  # [T, T]
    return ((causal[None] & token_mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)[None])[:, None]


def segment_layout(segment_ids: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, T] restarting at 0 in each document, and the SDPA mask [B, 1, T, T] (True =
    attend) of causal attention within a document, for rows of packed documents."""
    if segment_ids.dim() != 2 or segment_ids.shape[1] != T or segment_ids.dtype.is_floating_point:
        raise ValueError(f"segment_ids must be an integer [B, T] tensor matching input_ids: got "
                         f"{segment_ids.dtype} {list(segment_ids.shape)}")
    idx = torch.arange(T, device=segment_ids.device)
    start = torch.where(segment_starts(segment_ids), idx, 0).cummax(dim=1).values  # each token's document start
    causal = idx[None, :] <= idx[:, None]  # [T, T]
    mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return idx - start, mask[:, None]


def packing_for(B: int, T: int, device: torch.device, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                cache: HybridCache | None, slots: list[int] | None) -> Packing | None:
    """The layout of a packed or cached forward (None for a plain batch): packed sequences from
    cu_seqlens, or each row of a cached batch as one sequence; with a cache, the cache hands out
    the positions, masks and states of the slots written."""
    if slots is not None and cache is None:
        raise ValueError("slots name cache slots: pass cache= too")
    if cache is None and cu_seqlens is None:
        return None
    if attention_mask is not None or position_ids is not None:
        raise ValueError("attention_mask and position_ids are for a plain uncached batch: a packed or cached "
                         "forward takes positions from cu_seqlens and the cache (pack sequences instead of padding)")
    if cu_seqlens is not None:
        bounds = check_cu_seqlens(cu_seqlens, B, T)
        seqlens = [b - a for a, b in zip(bounds, bounds[1:])]
    else:
        seqlens = [T] * B
    if cache is None:
        return Packing.of(seqlens, device)
    return cache.begin(list(range(len(seqlens))) if slots is None else list(slots), seqlens)


class XinzhouLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # the pad row gets no gradient (and starts at zero), as in MiniMax's code (padding_idx)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
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
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                nn.init.normal_(module.w13, std=std)
                nn.init.normal_(module.w2, std=std)
                if module.correction_bias is not None:
                    module.correction_bias.zero_()

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                      token_mask: torch.Tensor | None, packing: Packing | None,
                      segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks and the final norm for a layout forward() has worked out (or, for a decode step
        replayed at fixed shapes, engine/graphs.py): the hidden states [B, T, C] and each block's
        balance statistics."""
        x = self.embed(input_ids)  # [B, T, C] ([1, B * T, C] packed)
        cos, sin = rope_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta, x.dtype)
        stats = []
        for block in self.layers:
            x, s = block(x, cos, sin, mask, token_mask, packing, segment_ids)
            stats.append(s)
        return self.norm(x), stats

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., C] -> logits [..., V] (in fp32 when config.lm_head_fp32)."""
        w = self.head_weight()
        if self.config.lm_head_fp32:  # outside autocast, or it would run in bf16 anyway
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.float(), w.float())
        return F.linear(x, w)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: HybridCache | None = None,
                slots: list[int] | None = None, segment_ids: torch.Tensor | None = None,
                return_parts: bool = False, last_logits_only: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [B, T] in one of three layouts:
        - a plain batch, causal per row: attention_mask [B, T] (1 = token, 0 = left padding) and
          position_ids [B, T] are optional;
        - packed: B = 1 and cu_seqlens [N + 1] = [0, len_0, len_0 + len_1, ..., T] (int32/int64): N
          independent sequences, positions restarting at 0 in each;
        - with a cache: row b (or packed sequence b) continues cache slot slots[b] (default b).
        segment_ids [B, T] (training on packed windows; plain batch only): each row holds several
        documents, runs of equal ids, and each is computed as if alone: positions restart at 0,
        softmax attention stays inside the document, the lightning state starts from zero.
        Without targets: float32 logits [B, T, V]; last_logits_only: [B, 1, V], or [1, N, V] for
        packed input (each sequence's last token). With targets [B, T] (-100 = ignore): the loss
        CE + router_aux_loss_coef * balance loss, or (loss, ce, aux) with return_parts."""
        cfg = self.config
        B, T = input_ids.shape
        packing = packing_for(B, T, input_ids.device, attention_mask, position_ids, cu_seqlens, cache, slots)
        token_mask = None if attention_mask is None else attention_mask.bool()
        if packing is not None:
            position_ids = packing.position_ids  # [1, B * T]
            input_ids = input_ids.reshape(1, B * T)  # rows of a cached batch are packed sequences
        elif position_ids is None and segment_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
            if token_mask is not None:
                position_ids = (token_mask.long().cumsum(1) - 1).clamp(min=0)
        mask = padding_mask(token_mask, T, input_ids.device)
        if segment_ids is not None:
            if packing is not None or attention_mask is not None or position_ids is not None:
                raise ValueError("segment_ids are for a plain batch of packed training windows: not with "
                                 "cu_seqlens, a cache, attention_mask or position_ids")
            position_ids, mask = segment_layout(segment_ids, T)

        x, stats = self.hidden_states(input_ids, position_ids, mask, token_mask, packing, segment_ids)
        if cache is not None:
            cache.end(packing)

        if cu_seqlens is not None and last_logits_only:  # prefill: each sequence's next-token distribution
            x = x[:, packing.last_index]  # [1, N, C]
        else:
            x = x.view(B, T, -1)  # [B, T, C]
            if last_logits_only:
                x = x[:, -1:]
        if targets is not None and not torch.compiler.is_compiling():
            # the head and the loss only where there is a target (SFT trains a fraction of the tokens);
            # the mean over those is the loss ignore_index gives, with the same gradients
            keep = targets.reshape(-1) != -100
            x, targets = x.reshape(-1, x.shape[-1])[keep], targets.reshape(-1)[keep]
        logits = self.head(x)  # [B, T, V]
        if targets is None:
            return logits.float()
        # from the head's dtype: the fused kernel on CUDA reads bf16 logits once (no fp32 copy)
        ce = cross_entropy(logits.view(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-100)
        aux = moe_ops.balance_loss(torch.stack(stats).sum(0))
        loss = ce + cfg.router_aux_loss_coef * aux
        return (loss, ce, aux) if return_parts else loss
