"""Prefix reuse: recent cache snapshots, keyed by the tokens they hold, least recently used first out.

A lightning state exists only where a snapshot was taken, so the engine takes them where
conversations resume: at the end of each request's prompt and of its generated turn. A returning
conversation restores the longest snapshot whose tokens are a prefix of its new prompt (its
lightning states copied, its full KV pages shared) and prefills only the rest.

Memory is bounded twice: the snapshots' lightning states by `max_state_bytes`, their count by
`max_entries`; the KV pages they hold come from the cache's pool and are given back (`evict_lru`)
when a request needs room.
"""

from __future__ import annotations

from collections import OrderedDict

from xinzhou.cache import HybridCache, Snapshot


class PrefixCache:
    def __init__(self, cache: HybridCache, max_state_bytes: int, max_entries: int) -> None:
        if max_state_bytes < 0 or max_entries < 0:
            raise ValueError(f"max_state_bytes = {max_state_bytes}, max_entries = {max_entries}: must be >= 0")
        self.cache, self.max_state_bytes, self.max_entries = cache, max_state_bytes, max_entries
        self.entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self.state_bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, prompt: list[int]) -> Snapshot | None:
        """The longest snapshot that is a proper prefix of prompt (at least one token is left to
        prefill, whose logits give the next token), marked as recently used."""
        best: tuple[int, ...] | None = None
        for key in self.entries:
            if len(key) < len(prompt) and (best is None or len(key) > len(best)) and tuple(prompt[:len(key)]) == key:
                best = key
        if best is None:
            return None
        self.entries.move_to_end(best)
        return self.entries[best]

    def add(self, tokens: list[int], slot: int) -> None:
        """Snapshot slot, which holds exactly `tokens`, unless that prefix is already kept."""
        key = tuple(tokens)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        size = self.cache.state_bytes_per_slot
        if self.max_entries == 0 or size > self.max_state_bytes:
            return
        while self.entries and (len(self.entries) >= self.max_entries or self.state_bytes + size > self.max_state_bytes):
            self.evict_lru()
        snap = self.cache.snapshot(slot)
        if snap.length != len(key):
            self.cache.drop(snap)
            raise ValueError(f"slot {slot} holds {snap.length} tokens, not the {len(key)} given")
        self.entries[key] = snap
        self.state_bytes += snap.state_bytes()

    def evict_lru(self, keep: Snapshot | None = None) -> bool:
        """Drop the least recently used snapshot (not `keep`); False when there is none to drop."""
        for key, snap in self.entries.items():
            if snap is not keep:
                del self.entries[key]
                self.state_bytes -= snap.state_bytes()
                self.cache.drop(snap)
                return True
        return False

    def clear(self) -> None:
        while self.evict_lru():
            pass
