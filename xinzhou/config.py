"""Frozen configuration dataclasses.

`ModelConfig` expresses both MiniMax families with one set of fields:
MiniMax-Text-01 / M1 (hybrid lightning + softmax attention, softmax router, post-norm DeepNorm
residuals) and MiniMax-M2 (all softmax attention, sigmoid router with correction bias, qk-norm,
pre-norm residuals). Presets: `tiny` (CPU tests), `small` (the 306.8M benchmark shape),
`text01` and `m2` (the released shapes; build those on the meta device).

    from xinzhou.config import preset
    cfg = preset("tiny", vocab_size=1024)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

LayerType = Literal["lightning", "softmax"]
LAYER_TYPES = ("lightning", "softmax")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]  # one entry per layer: "lightning" or "softmax"
    num_heads: int
    num_kv_heads: int  # softmax layers only (GQA); lightning layers use num_heads
    head_dim: int
    rotary_dim: int  # RoPE on the first rotary_dim dims of each head (NeoX rotate-half)
    rope_theta: float
    num_experts: int
    experts_per_token: int
    expert_dim: int  # SwiGLU width of one expert
    router: Literal["softmax", "sigmoid"] = "softmax"
    qk_norm: bool = False  # RMSNorm over the whole q and k projections (M2)
    residual: Literal["deepnorm", "prenorm"] = "deepnorm"
    # DeepNorm factors: y = alpha * LN(x) + beta * F(LN(x)); ignored for prenorm
    linear_attn_alpha: float = 1.0
    linear_attn_beta: float = 1.0
    full_attn_alpha: float = 1.0
    full_attn_beta: float = 1.0
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0
    block_size: int = 256  # lightning attention block; any size gives the same result
    norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6  # the RMSNorm over concatenated lightning heads
    tie_embeddings: bool = False
    lm_head_fp32: bool = False  # MiniMax-M1: an fp32 head keeps train/inference probs aligned
    router_aux_loss_coef: float = 0.001
    max_position_embeddings: int = 1 << 20
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        # types first: a string or None in a size would otherwise fail later, far from its cause
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", "int | None"):
                ok = (isinstance(v, int) and not isinstance(v, bool)) or (v is None and f.type == "int | None")
                expected = "an integer" + (" or None" if f.type == "int | None" else "")
            elif f.type == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                expected = "a number"
            elif f.type == "bool":
                ok, expected = isinstance(v, bool), "True or False"
            else:
                continue
            if not ok:
                raise ValueError(f"{f.name} = {v!r}: expected {expected}")
        if isinstance(self.layer_types, str) or not isinstance(self.layer_types, (tuple, list)):
            raise ValueError(f"layer_types = {self.layer_types!r}: expected a sequence of 'lightning' / 'softmax'")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}] = {t!r}: expected one of {LAYER_TYPES}")
        positive = ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "num_experts",
                    "experts_per_token", "expert_dim", "block_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be > 0")
        if not self.layer_types:
            raise ValueError("layer_types is empty: a model needs at least one layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads = {self.num_heads} is not a multiple of num_kv_heads = {self.num_kv_heads}")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim = {self.rotary_dim}: must be even and in [0, head_dim = {self.head_dim}]")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token = {self.experts_per_token} > num_experts = {self.num_experts}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"{name} = {v}: outside the vocabulary [0, {self.vocab_size})")
        if self.router not in ("softmax", "sigmoid"):
            raise ValueError(f"router = {self.router!r}: expected 'softmax' or 'sigmoid'")
        if self.residual not in ("deepnorm", "prenorm"):
            raise ValueError(f"residual = {self.residual!r}: expected 'deepnorm' or 'prenorm'")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    def num_params(self, active: bool = False) -> int:
        """Parameter count computed from the shapes (works for the real sizes without building them).
        active=True: what one token uses (top-k experts), without embedding and LM head, as MiniMax counts."""
        h, d = self.hidden_size, self.head_dim
        hd, kvd = self.num_heads * d, self.num_kv_heads * d
        e = self.experts_per_token if active else self.num_experts
        moe = h * self.num_experts + e * 3 * h * self.expert_dim
        total = h + (0 if active else self.vocab_size * h * (1 if self.tie_embeddings else 2))
        for t in self.layer_types:
            if t == "lightning":
                attn = h * 3 * hd + h * hd + hd + hd * h
            else:
                attn = h * hd + 2 * h * kvd + hd * h + (hd + kvd if self.qk_norm else 0)
            total += attn + moe + 2 * h
        return total


def _pattern(spec: str) -> tuple[str, ...]:
    return tuple({"L": "lightning", "S": "softmax"}[c] for c in spec)


def _deepnorm(num_layers: int) -> dict[str, float]:
    alpha = (2 * num_layers) ** 0.25  # DeepNorm alpha for a decoder of N layers
    return dict(linear_attn_alpha=alpha, full_attn_alpha=alpha, mlp_alpha=alpha)


def preset(name: str, **overrides: object) -> ModelConfig:
    """The named shape, with any field overridden."""
    if name == "tiny":
        base = dict(vocab_size=512, hidden_size=64, layer_types=_pattern("LLLS"), num_heads=4,
                    num_kv_heads=2, head_dim=16, rotary_dim=8, rope_theta=10000.0, num_experts=4,
                    experts_per_token=2, expert_dim=128, block_size=64, **_deepnorm(4))
    elif name == "small":
        # the 306.8M shape of the transformers MiniMaxForCausalLM anchor in benchmarks/RESULTS.md
        base = dict(vocab_size=32000, hidden_size=1024, layer_types=_pattern("LLLLLLLS"), num_heads=16,
                    num_kv_heads=8, head_dim=64, rotary_dim=64, rope_theta=1e6, num_experts=8,
                    experts_per_token=2, expert_dim=1024, **_deepnorm(8))
    elif name == "text01":
        base = dict(vocab_size=200064, hidden_size=6144, layer_types=_pattern("LLLLLLLS" * 10), num_heads=64,
                    num_kv_heads=8, head_dim=128, rotary_dim=64, rope_theta=1e7, num_experts=32,
                    experts_per_token=2, expert_dim=9216, max_position_embeddings=10240000, **_deepnorm(80))
    elif name == "m2":
        base = dict(vocab_size=200064, hidden_size=3072, layer_types=_pattern("S" * 62), num_heads=48,
                    num_kv_heads=8, head_dim=128, rotary_dim=64, rope_theta=5e6, num_experts=256,
                    experts_per_token=8, expert_dim=1536, router="sigmoid", qk_norm=True, residual="prenorm",
                    norm_eps=1e-6, max_position_embeddings=196608, bos_token_id=200034, eos_token_id=200020)
    else:
        raise ValueError(f"unknown preset {name!r}: expected one of tiny, small, text01, m2")
    base.update(overrides)
    return ModelConfig(**base)
