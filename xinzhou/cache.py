"""Decoding cache for the hybrid model: KV for softmax layers, fp32 state for lightning layers.

One object holds every layer for a batch of B slots:
    k[i], v[i]: [B, KV, capacity, D]   softmax layer i (SDPA layout), grown on demand
    state[i]:   [B, H, D, D] fp32      lightning layer i: constant size whatever the context
    valid:      [B, capacity] bool     key position holds a real token (False for padding)
    pos:        [B] long               RoPE position of each slot's next real token
    length:     int                    positions written so far (the same for every slot)

Slots advance together (one write cursor); each slot has its own positions and valid mask, so a
left-padded batch decodes exactly, and `reset_slot` frees a slot for a new sequence.
"""

from __future__ import annotations

import torch

from xinzhou.config import ModelConfig


class HybridCache:
    def __init__(self, config: ModelConfig, batch_size: int, capacity: int = 256,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.batch_size = batch_size
        self.capacity = max(1, capacity)
        self.device = torch.device(device)
        self.dtype = dtype
        self.length = 0
        B, KV, D, H = batch_size, config.num_kv_heads, config.head_dim, config.num_heads
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.state: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(config.layer_types):
            if kind == "softmax":
                self.k[i] = torch.zeros(B, KV, self.capacity, D, device=self.device, dtype=dtype)
                self.v[i] = torch.zeros(B, KV, self.capacity, D, device=self.device, dtype=dtype)
            else:
                self.state[i] = torch.zeros(B, H, D, D, device=self.device, dtype=torch.float32)
        self.valid = torch.zeros(B, self.capacity, dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(B, dtype=torch.long, device=self.device)

    def reserve(self, n: int) -> None:
        """Make room for n more positions (doubling, so appends stay amortised O(1))."""
        need = self.length + n
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        grow = new_cap - self.capacity
        for store in (self.k, self.v):
            for i, t in store.items():
                store[i] = torch.cat([t, t.new_zeros(*t.shape[:2], grow, t.shape[3])], dim=2)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch_size, grow)], dim=1)
        self.capacity = new_cap

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, KV, T, D] at the cursor; return all keys and values so far."""
        T = k.shape[2]
        self.k[layer][:, :, self.length:self.length + T] = k
        self.v[layer][:, :, self.length:self.length + T] = v
        end = self.length + T
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset_slot(self, b: int) -> None:
        """Free slot b for a new sequence."""
        for t in self.state.values():
            t[b].zero_()
        self.valid[b].zero_()
        self.pos[b] = 0

    def memory_bytes(self) -> int:
        tensors = [*self.k.values(), *self.v.values(), *self.state.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
