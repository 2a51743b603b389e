"""Decoding cache for the hybrid model, and the layout of a packed batch.

The cache holds `num_slots` sequences; each slot owns its bookkeeping:
    state[i]:        [num_slots, H, D, D] fp32   lightning layer i: constant size whatever the length
    k_pool[i]:       [rows, KV, D]               softmax layer i: KV of every page, rows = pages * page_size
    v_pool[i]:       [rows, KV, D]
    lengths[slot]:   tokens written so far (the RoPE position of its next token)
    pages[slot]:     the pool pages holding its keys, in order (position p is in pages[p // page_size])

Pages come from one pool shared by every softmax layer (a page holds page_size positions of every
softmax layer), so a finished sequence returns its memory at once (`release`) and a long-lived cache
serving short requests never grows. Pages are reference counted: a prefix snapshot (`snapshot` /
`restore`) shares the full pages of a prompt with the sequences that continue it.

The model never edits these fields. For each forward it asks `begin(slots, seqlens)` for a
`Packing`: the positions of the tokens about to be written, the attention mask over cached + new
keys, where each new key goes, and the lightning states to start from; `end(packing)` then
advances the lengths. Without a cache, `Packing.of(seqlens)` gives the same layout for a packed
batch of independent sequences (FlashAttention style: [1, total] with cu_seqlens).

Shape legend: N sequences in the step, Tm longest new run, S longest cached + new length,
KV key/value heads, D head dim, H lightning heads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, CausalVariant

from xinzhou.config import ModelConfig
from xinzhou.ops.lightning import lightning_decode


def cache_sizes(config: ModelConfig, page_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of one KV page: page_size positions of K and V in every softmax layer, bytes of one
    slot's lightning states)."""
    c = config
    kinds = c.layer_types
    page = kinds.count("softmax") * 2 * page_size * c.num_kv_heads * c.head_dim * dtype.itemsize
    return page, kinds.count("lightning") * c.num_heads * c.head_dim * c.head_dim * 4


class CacheFull(RuntimeError):
    """The fixed page pool has no room for the tokens asked for."""


@dataclass
class Packing:
    """Layout of N sequences packed as [1, total] tokens, for one forward.

    seqlens[i] new tokens of sequence i start at packed index cu[i] and at position starts[i] (its
    cached length; 0 without a cache). Attention runs on a padded [N, Tm] view of the queries
    (`pad` / `unpad`) against [N, S] keys (`keys_values`) under `mask`, which is built only when
    needed: one sequence alone (a long prompt's chunks), or one chunk beside decoding rows, attends
    causally aligned to its last key through a bias that FlashAttention takes without a mask (at a
    1M-token context and 8K-token chunks the N-row mask was 8 GiB a step)."""
    seqlens: list[int]
    starts: list[int]
    cu_seqlens: torch.Tensor  # [N + 1] int32
    position_ids: torch.Tensor  # [1, total]
    last_index: torch.Tensor  # [N]: packed index of each sequence's last token
    q_index: torch.Tensor  # [N, Tm]: packed index of each padded query (clamped inside its sequence)
    unpad_index: torch.Tensor  # [total]: row of each packed token in the flattened [N * Tm] view
    cache: HybridCache | None = None
    slots: list[int] = field(default_factory=list)
    write_rows: torch.Tensor | None = None  # [total]: pool row each new key goes to (with a cache)
    read_rows: torch.Tensor | None = None  # [N, S]: pool row of every key of each sequence
    _slot_index: torch.Tensor | None = None  # slots as a device tensor, built on first use
    _mask: torch.Tensor | None = None  # `mask`, built on first use (or given: engine/graphs.py)

    @staticmethod
    def of(seqlens: list[int], device: torch.device, starts: list[int] | None = None) -> Packing:
        """The layout of independent sequences (no cache): keys are the new tokens only, unless
        `starts` (from a cache) put cached keys before them."""
        if not seqlens or any(n < 1 for n in seqlens):
            raise ValueError(f"every packed sequence needs at least one token: got lengths {seqlens}")
        starts = [0] * len(seqlens) if starts is None else starts
        N, Tm = len(seqlens), max(seqlens)
        lens = torch.tensor(seqlens, dtype=torch.long)
        cu = torch.zeros(N + 1, dtype=torch.long)
        cu[1:] = lens.cumsum(0)
        seq_of = torch.repeat_interleave(torch.arange(N), lens)  # [total]
        offset = torch.arange(int(cu[-1])) - cu[seq_of]  # index of each token inside its sequence
        start = torch.tensor(starts, dtype=torch.long)
        t = torch.arange(Tm)
        q_index = cu[:-1, None] + torch.minimum(t[None, :], lens[:, None] - 1)  # [N, Tm]
        return Packing(
            seqlens=list(seqlens), starts=list(starts),
            cu_seqlens=cu.to(device=device, dtype=torch.int32),
            position_ids=(start[seq_of] + offset)[None].to(device),
            last_index=(cu[1:] - 1).to(device),
            q_index=q_index.to(device),
            unpad_index=(seq_of * Tm + offset).to(device))

    @property
    def keys(self) -> int:
        """S: the keys of the longest sequence (cached + new)."""
        return max(a + n for a, n in zip(self.starts, self.seqlens))

    @property
    def mask(self) -> torch.Tensor:
        """[N, 1, Tm, S] bool, True = attend: causal within each sequence."""
        if self._mask is None:
            self._mask = self.mask_of(range(len(self.seqlens)), max(self.seqlens))
        return self._mask

    def mask_of(self, rows: Iterable[int], Tm: int) -> torch.Tensor:
        """The mask of some sequences only, over Tm queries: [len(rows), 1, Tm, S]."""
        rows = list(rows)
        start = torch.tensor([self.starts[i] for i in rows], dtype=torch.long)
        end = start + torch.tensor([self.seqlens[i] for i in rows], dtype=torch.long)
        s = torch.arange(self.keys)
        q_pos = start[:, None] + torch.arange(Tm)[None, :]  # [rows, Tm]
        # a padded query row (t >= n) sees its sequence's keys: finite, and dropped by unpad
        mask = (s[None, None, :] <= q_pos[:, :, None]) & (s[None, None, :] < end[:, None, None])
        return mask[:, None].to(self.position_ids.device)

    @property
    def total(self) -> int:
        return sum(self.seqlens)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[1, total, ...] -> [N, Tm, ...]"""
        return x[0, self.q_index]

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """[N, Tm, ...] -> [1, total, ...]"""
        return y.flatten(0, 1)[self.unpad_index][None]

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New keys and values [1, total, KV, D] -> every key and value each sequence attends to,
        [N, KV, S, D]; with a cache the new ones are stored first (the cache writes its own pool)."""
        if self.cache is None:
            return self.pad(k).transpose(1, 2), self.pad(v).transpose(1, 2)
        return self.cache.write_and_read(layer, k[0], v[0], self)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Softmax attention of the new queries q [1, total, H, D] over k, v [N, KV, S, D] (from
        `keys_values`) -> [1, total, H, D]. When one-token sequences (decoding) share the step with
        longer ones (prompt chunks), the one-token rows are attended on their own at one query
        each: in the padded [N, Tm] view they would cost Tm queries apiece."""
        qp = self.pad(q).transpose(1, 2)  # [N, H, Tm, D]
        Tm = qp.shape[2]
        if len(self.seqlens) == 1 and self._mask is None:
            return self.unpad(_causal_to_end(qp, k, v, gqa).transpose(1, 2))
        ones = [i for i, n in enumerate(self.seqlens) if n == 1]
        if Tm == 1 or not ones or len(ones) == len(self.seqlens):
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=self.mask, enable_gqa=gqa)
            return self.unpad(o.transpose(1, 2))
        rest = [i for i, n in enumerate(self.seqlens) if n > 1]
        o = qp.new_zeros(qp.shape)  # the padded rows of one-token sequences stay 0 and are dropped by unpad
        one = torch.tensor(ones, device=q.device)
        o[one, :, :1] = F.scaled_dot_product_attention(qp[one, :, :1], k[one], v[one],
                                                       attn_mask=self.mask_of(ones, 1), enable_gqa=gqa)
        if len(rest) == 1:  # one prompt chunk beside decoding requests: its own keys, no mask
            i, n = rest[0], self.seqlens[rest[0]]
            end = self.starts[i] + n
            o[i:i + 1, :, :n] = _causal_to_end(qp[i:i + 1, :, :n], k[i:i + 1, :, :end], v[i:i + 1, :, :end], gqa)
        else:
            many = torch.tensor(rest, device=q.device)
            o[many] = F.scaled_dot_product_attention(qp[many], k[many], v[many], attn_mask=self.mask_of(rest, Tm),
                                                     enable_gqa=gqa)
        return self.unpad(o.transpose(1, 2))

    @property
    def decode_only(self) -> bool:
        """One new token per sequence, written to a cache: lightning layers step each slot's state
        in place (`lightning_decode` on the pool) instead of reading and writing copies."""
        return self.cache is not None and all(n == 1 for n in self.seqlens)

    def decode_in_place(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        slopes: torch.Tensor) -> torch.Tensor:
        """q, k, v [total, H, D] of a decode step -> o [total, H, D]; each slot's state advanced."""
        if self._slot_index is None:
            self._slot_index = torch.tensor(self.slots, dtype=torch.long, device=q.device)
        return lightning_decode(q, k, v, slopes, self.cache.state[layer], slots=self._slot_index)

    def lightning_state(self, layer: int) -> torch.Tensor | None:
        """[N, H, D, D] fp32 states the sequences continue from (None without a cache: zeros)."""
        return None if self.cache is None else self.cache.read_state(layer, self.slots)

    def store_lightning_state(self, layer: int, state: torch.Tensor | None) -> None:
        if self.cache is not None:
            self.cache.write_state(layer, self.slots, state)


def _causal_to_end(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    """One sequence's Tm queries [1, H, Tm, D], the last Tm of its S keys [1, KV, S, D]: query t
    sees keys up to S - Tm + t (causal aligned to the end). Through torch's lower-right causal bias,
    which FlashAttention takes without a mask (CUDA, 16-bit, sm80 or newer); elsewhere torch builds
    the one sequence's [Tm, S] mask itself."""
    Tm, S = q.shape[2], k.shape[2]
    if Tm == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=lower_right_bias(Tm, S), enable_gqa=gqa)


def lower_right_bias(Tm: int, S: int) -> CausalBias:
    """torch's `causal_lower_right(Tm, S)` without the storage its constructor allocates: CausalBias
    passes its arguments to the legacy Tensor(variant, Tm, S) constructor, an uninitialised float32
    [2, Tm, S] (64 GiB at Tm = 8K, S = 1M, refused outright where memory is smaller). Here the bias
    is a view of an empty tensor carrying only its variant and lengths, which is all SDPA reads."""
    bias = torch.Tensor._make_subclass(CausalBias, torch.empty(0))
    CausalBias.__init__(bias, CausalVariant.LOWER_RIGHT, Tm, S)
    return bias


@dataclass
class Snapshot:
    """The cache contents of one sequence at `length` tokens: its lightning states (copies) and the
    pages holding its keys (shared, reference counted)."""
    length: int
    pages: list[int]
    states: dict[int, torch.Tensor]  # layer -> [H, D, D] fp32

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())


class HybridCache:
    """num_pages=None: the pool grows on demand (doubling); an int: a fixed pool, `CacheFull` when
    it runs out (the engine checks `can_reserve` before admitting a request)."""

    def __init__(self, config: ModelConfig, num_slots: int, *, num_pages: int | None = None,
                 page_size: int = 16, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if num_slots < 1 or page_size < 1 or (num_pages is not None and num_pages < 0):
            raise ValueError(f"num_slots = {num_slots}, page_size = {page_size}, num_pages = {num_pages}: "
                             f"need num_slots >= 1, page_size >= 1, num_pages >= 0")
        self.config, self.num_slots, self.page_size = config, num_slots, page_size
        self.device, self.dtype = torch.device(device), dtype
        self.growable = num_pages is None
        pages = 4 if num_pages is None else num_pages
        KV, D, H = config.num_kv_heads, config.head_dim, config.num_heads
        self.kv_layers = [i for i, t in enumerate(config.layer_types) if t == "softmax"]
        self.lightning_layers = [i for i, t in enumerate(config.layer_types) if t == "lightning"]
        self.k_pool = {i: torch.zeros(pages * page_size, KV, D, device=self.device, dtype=dtype) for i in self.kv_layers}
        self.v_pool = {i: torch.zeros(pages * page_size, KV, D, device=self.device, dtype=dtype) for i in self.kv_layers}
        self.state = {i: torch.zeros(num_slots, H, D, D, device=self.device, dtype=torch.float32)
                      for i in self.lightning_layers}
        self.num_pages = pages if self.kv_layers else 0
        self.refcount = [0] * self.num_pages
        self.free_pages = list(range(self.num_pages - 1, -1, -1))  # a stack: low pages first
        self.lengths = [0] * num_slots
        self.pages: list[list[int]] = [[] for _ in range(num_slots)]
        self.free_slots = list(range(num_slots - 1, -1, -1))

    # sizes -----------------------------------------------------------------------------------
    @property
    def page_bytes(self) -> int:
        return cache_sizes(self.config, self.page_size, self.dtype)[0]

    @property
    def state_bytes_per_slot(self) -> int:
        return cache_sizes(self.config, self.page_size, self.dtype)[1]

    def memory_bytes(self) -> int:
        tensors = [*self.k_pool.values(), *self.v_pool.values(), *self.state.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size) if self.kv_layers else 0

    # slots -----------------------------------------------------------------------------------
    def acquire(self) -> int:
        """A free slot, empty (length 0, zero state)."""
        if not self.free_slots:
            raise CacheFull(f"all {self.num_slots} slots are in use")
        return self.free_slots.pop()

    def release(self, slot: int) -> None:
        """Free slot and return its pages to the pool (those no snapshot still holds)."""
        self._check_slot(slot)
        self._unref(self.pages[slot])
        self.pages[slot] = []
        self.lengths[slot] = 0
        for t in self.state.values():
            t[slot].zero_()
        if slot not in self.free_slots:
            self.free_slots.append(slot)

    def can_reserve(self, slot: int, n_tokens: int) -> bool:
        return self.growable or self.pages_for(n_tokens) - len(self.pages[slot]) <= len(self.free_pages)

    def reserve(self, slot: int, n_tokens: int) -> None:
        """Make slot's pages cover n_tokens positions (all at once, or CacheFull and nothing taken)."""
        need = self.pages_for(n_tokens) - len(self.pages[slot])
        if need <= 0:
            return
        if need > len(self.free_pages):
            if not self.growable:
                raise CacheFull(f"slot {slot} needs {need} more pages of {self.page_size} tokens; "
                                f"{len(self.free_pages)} of {self.num_pages} are free")
            self._grow(max(self.num_pages, need - len(self.free_pages)))
        for _ in range(need):
            p = self.free_pages.pop()
            self.refcount[p] = 1
            self.pages[slot].append(p)

    def _grow(self, extra: int) -> None:
        rows = extra * self.page_size
        for pool in (self.k_pool, self.v_pool):
            for i, t in pool.items():
                pool[i] = torch.cat([t, t.new_zeros(rows, *t.shape[1:])])
        self.free_pages.extend(range(self.num_pages + extra - 1, self.num_pages - 1, -1))
        self.refcount.extend([0] * extra)
        self.num_pages += extra

    def _unref(self, pages: list[int]) -> None:
        for p in pages:
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                self.free_pages.append(p)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside [0, num_slots = {self.num_slots})")

    # one forward -----------------------------------------------------------------------------
    def begin(self, slots: list[int], seqlens: list[int]) -> Packing:
        """Layout for writing seqlens[i] new tokens to slots[i] (each slot at most once)."""
        if len(slots) != len(seqlens):
            raise ValueError(f"{len(slots)} slots for {len(seqlens)} sequences")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots}: a slot can appear once per forward")
        for s in slots:
            self._check_slot(s)
        starts = [self.lengths[s] for s in slots]
        for s, a, n in zip(slots, starts, seqlens):
            self.reserve(s, a + n)
        packing = Packing.of(seqlens, self.device, starts)
        packing.cache, packing.slots = self, list(slots)
        if self.kv_layers:
            S = packing.keys
            width = max(len(self.pages[s]) for s in slots)
            table = torch.tensor([self.pages[s] + [0] * (width - len(self.pages[s])) for s in slots],
                                 dtype=torch.long)  # [N, width]
            pos = torch.arange(S)
            ps = self.page_size
            read = table[:, pos // ps] * ps + pos % ps  # [N, S]
            seq_of = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(seqlens))  # [total]
            new_pos = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, seqlens)])  # [total]
            packing.read_rows = read.to(self.device)
            packing.write_rows = read[seq_of, new_pos].to(self.device)
        return packing

    def end(self, packing: Packing) -> None:
        """The forward wrote its tokens: advance each slot's length."""
        for s, n in zip(packing.slots, packing.seqlens):
            self.lengths[s] += n

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                       packing: Packing) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [total, KV, D] -> stored at their pool rows; returns [N, KV, S, D] keys and values."""
        self.k_pool[layer][packing.write_rows] = k.to(self.dtype)
        self.v_pool[layer][packing.write_rows] = v.to(self.dtype)
        rows = packing.read_rows
        return self.k_pool[layer][rows].transpose(1, 2), self.v_pool[layer][rows].transpose(1, 2)

    def read_state(self, layer: int, slots: list[int]) -> torch.Tensor:
        return self.state[layer][slots]  # [N, H, D, D] (a copy: index with a list)

    def write_state(self, layer: int, slots: list[int], state: torch.Tensor) -> None:
        self.state[layer][slots] = state.float()

    # prefix snapshots ------------------------------------------------------------------------
    def snapshot(self, slot: int) -> Snapshot:
        """Slot's contents at its current length (a lightning state exists only there): states
        copied, pages shared."""
        length = self.lengths[slot]
        pages = self.pages[slot][:self.pages_for(length)]
        for p in pages:
            self.refcount[p] += 1
        return Snapshot(length, pages, {i: self.state[i][slot].clone() for i in self.lightning_layers})

    def restore(self, slot: int, snap: Snapshot) -> None:
        """Start empty slot from snap: its states copied, its full pages shared; a partly filled last
        page is copied into a page of the slot's own, since the slot writes the rest of it."""
        if self.lengths[slot] or self.pages[slot]:
            raise ValueError(f"slot {slot} is not empty: release it before restoring a snapshot")
        full = snap.length // self.page_size if self.kv_layers else 0
        for p in snap.pages[:full]:
            self.refcount[p] += 1
        self.pages[slot] = list(snap.pages[:full])
        if len(snap.pages) > full:
            self.reserve(slot, (full + 1) * self.page_size)
            src, dst = snap.pages[full], self.pages[slot][full]
            ps = self.page_size
            for pool in (self.k_pool, self.v_pool):
                for t in pool.values():
                    t[dst * ps:(dst + 1) * ps] = t[src * ps:(src + 1) * ps]
        for i, s in snap.states.items():
            self.state[i][slot] = s
        self.lengths[slot] = snap.length

    def drop(self, snap: Snapshot) -> None:
        """Forget a snapshot: its pages return to the pool once no slot uses them."""
        self._unref(snap.pages)
        snap.pages = []

    def pages_to_restore(self, snap: Snapshot, n_tokens: int) -> int:
        """Fresh pages a slot restored from snap needs to reach n_tokens positions."""
        full = snap.length // self.page_size if self.kv_layers else 0
        return max(self.pages_for(n_tokens) - full, 0)
