"""Corpora -> tokenized shards on disk -> a deterministic, resumable, rank-aware batch loader.

A shard directory holds
    tokens.bin  uint16/uint32 token ids, documents back to back (numpy memmap)
    mask.bin    uint8 loss mask (1 = learn to predict this token)
    docs.npy    int64 start offset of every document, plus the total length at the end
    meta.json   dtype, counts, vocab size, sources
and is written atomically (xinzhou.atomic: temporary directory + rename), only over a shard
directory xinzhou wrote.

Sources: the task curriculum (xinzhou.tasks), or user files: .txt (one document per file, or per
blank-line-separated paragraph with `paragraphs=True`), .jsonl (`{"text": ...}` or
`{"messages": [...], "tools": [...]}` chat records, rendered with chat_format and a loss mask),
.parquet (a `text` or `messages` column; needs pyarrow).

    write_shards(docs, "data/sft", vocab_size=tok.vocab_size)
    loader = PackedLoader("data/sft", seq_len=256, batch_size=16, rank=0, world_size=1, seed=0)
    x, y = loader.next_batch()       # y = -100 where the loss mask is 0 or on padding
    x, y, seg = loader.next_packed() # and the document of every input token (model(..., segment_ids=seg))
    state = loader.state_dict()      # resume with loader.load_state_dict(state)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from xinzhou.atomic import atomic_dir
from xinzhou.errors import DataError

__all__ = ["DataError", "PackedLoader", "open_shards", "pack_windows", "read_corpus", "tokenize_docs",
           "write_shards"]

Doc = tuple[list[int], list[int]]  # token ids, loss mask


# ----------------------------------------------------------------------------- reading corpora

def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from e


def read_corpus(path: str | os.PathLike, paragraphs: bool = False) -> Iterator[str | dict]:
    """Yield documents: a str for plain text, a dict with "messages" (and maybe "tools") for chat."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".parquet"))
        if not files:
            raise DataError(f"{path}: no .txt, .jsonl or .parquet files")
        for f in files:
            yield from read_corpus(f, paragraphs)
        return
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".txt":
        text = _read_text(path)
        yield from ([p for p in text.split("\n\n") if p.strip()] if paragraphs else [text])
    elif path.suffix == ".jsonl":
        text = _read_text(path)
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: invalid JSON ({e.msg}); a truncated file?") from e
            yield _record(rec, f"{path} line {n}")
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for damaged files
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        if table.num_rows == 0:
            raise DataError(f"{path}: parquet file has no rows")
        for n, rec in enumerate(table.to_pylist()):
            yield _record(rec, f"{path} row {n}")
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected .txt, .jsonl or .parquet)")


def _record(rec: object, where: str) -> str | dict:
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
        return {"messages": rec["messages"], "tools": rec.get("tools"), "where": where}
    raise DataError(f"{where}: expected a 'text' string or a 'messages' list")


def tokenize_docs(items: Iterable[str | dict], tokenizer) -> Iterator[Doc]:
    """Plain text -> bos + text + eos, all learned; chat -> chat_format render with its loss mask
    (an item's "keep_all_thinking" renders and trains every assistant turn with its thinking).
    A chat record that cannot be rendered raises DataError naming its "where" (file and line, as
    read_corpus gives it) or its position in `items`."""
    from xinzhou.chat_format import render

    for n, item in enumerate(items):
        if isinstance(item, str):
            ids = [tokenizer.bos_id, *tokenizer.encode(item), tokenizer.eos_id]
            yield ids, [0] + [1] * (len(ids) - 1)
        else:
            try:
                r = render(item["messages"], tokenizer, tools=item.get("tools"),
                           keep_all_thinking=item.get("keep_all_thinking", False))
            except (ValueError, TypeError, AttributeError, KeyError) as e:  # a malformed record
                raise DataError(f"{item.get('where') or f'document {n}'}: {e}") from e
            yield list(r.ids), list(r.loss_mask)


# ----------------------------------------------------------------------------- shards

def write_shards(docs: Iterable[Doc], out_dir: str | os.PathLike, vocab_size: int,
                 source: str = "") -> Path:
    """Write docs as a shard directory at out_dir. An existing out_dir is replaced only when it is
    a shard directory xinzhou wrote (else OutputError); it stays as it was if anything fails."""
    out = Path(out_dir)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    with atomic_dir(out, "shards") as tmp:
        starts, n = [0], 0
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm:
            for ids, mask in docs:
                if len(ids) != len(mask):
                    raise DataError(f"document {len(starts) - 1}: {len(ids)} tokens but {len(mask)} mask entries")
                if not ids:
                    continue
                arr = np.asarray(ids, dtype=np.int64)
                if arr.min() < 0 or arr.max() >= vocab_size:
                    raise DataError(f"document {len(starts) - 1}: token id outside [0, {vocab_size})")
                ft.write(arr.astype(dtype).tobytes())
                fm.write(np.asarray(mask, dtype=np.uint8).tobytes())
                n += len(ids)
                starts.append(n)
        if n == 0:
            raise DataError(f"{out}: no tokens to write (empty corpus)")
        np.save(tmp / "docs.npy", np.asarray(starts, dtype=np.int64))
        meta = dict(dtype=np.dtype(dtype).name, n_tokens=n, n_docs=len(starts) - 1, vocab_size=vocab_size,
                    source=source)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def open_shards(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such shard directory (write one with `xinzhou data`)")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError as e:
        raise DataError(f"{path}: no meta.json (not a shard directory, or an interrupted write)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path / 'meta.json'}: invalid JSON ({e})") from e
    fields = {"dtype": str, "n_tokens": int, "vocab_size": int}
    for key, kind in fields.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            got = meta.get(key) if isinstance(meta, dict) else meta
            raise DataError(f"{path / 'meta.json'}: field {key!r} is {got!r}, expected {kind.__name__}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path / 'meta.json'}: dtype {meta['dtype']!r}, expected 'uint16' or 'uint32'")
    for name in ("tokens.bin", "mask.bin", "docs.npy"):
        if not (path / name).is_file():
            raise DataError(f"{path}: {name} is missing (an incomplete copy?)")
    try:
        tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r")
        mask = np.memmap(path / "mask.bin", dtype=np.uint8, mode="r")
        docs = np.load(path / "docs.npy")
    except ValueError as e:  # numpy: an empty memmap, or a damaged .npy header
        raise DataError(f"{path}: unreadable shard files ({e})") from e
    if len(tokens) != meta["n_tokens"] or len(mask) != meta["n_tokens"] or docs[-1] != meta["n_tokens"]:
        raise DataError(f"{path}: tokens.bin has {len(tokens)} tokens, mask.bin {len(mask)}, "
                        f"meta.json says {meta['n_tokens']}: truncated or mismatched files")
    return tokens, mask, docs, meta


def pack_windows(doc_starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Greedy packing of whole documents into windows of at most seq_len + 1 tokens (inputs plus the
    shifted targets); a longer document is cut into pieces. Returns [N, 2] (start, end) token ranges."""
    cap = seq_len + 1
    windows, w_start, w_end = [], None, None
    for a, b in zip(doc_starts[:-1].tolist(), doc_starts[1:].tolist()):
        while b - a > cap:  # a long document: full windows first
            if w_start is not None:
                windows.append((w_start, w_end))
                w_start = None
            windows.append((a, a + cap))
            a += cap - 1  # overlap one token so every token is a target once
        if w_start is not None and b - w_start > cap:
            windows.append((w_start, w_end))
            w_start = None
        if w_start is None:
            w_start = a
        w_end = b
    if w_start is not None:
        windows.append((w_start, w_end))
    return np.asarray(windows, dtype=np.int64)


class PackedLoader:
    """Deterministic batches of packed windows: the global batch of a step is the same whatever the
    number of ranks; rank r takes rows [r*B, (r+1)*B). Each epoch is a fresh seeded permutation."""

    def __init__(self, path: str | os.PathLike, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, pad_id: int = 0) -> None:
        self.tokens, self.mask, self.docs, self.meta = open_shards(path)
        self.windows = pack_windows(self.docs, seq_len)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.pad_id = seed, pad_id
        self.global_batch = batch_size * world_size
        if len(self.windows) < self.global_batch:
            raise DataError(f"{path}: {len(self.windows)} windows of {seq_len} tokens, fewer than one global "
                            f"batch of {self.global_batch}")
        self.epoch, self.step = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

    @property
    def steps_per_epoch(self) -> int:
        return len(self.windows) // self.global_batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._perm = self._permutation(self.epoch)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_packed()[:2]

    def next_packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, segment_ids) [B, T]: inputs, targets and the document index of every input token
        (the padding at a window's end is one more segment), for document-masked training."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        first = self.step * self.global_batch + self.rank * self.batch_size
        rows = self._perm[first:first + self.batch_size]
        T = self.seq_len
        x = np.full((self.batch_size, T), self.pad_id, dtype=np.int64)
        y = np.full((self.batch_size, T), -100, dtype=np.int64)
        seg = np.empty((self.batch_size, T), dtype=np.int64)
        for i, w in enumerate(rows):
            a, b = self.windows[w]
            ids = np.asarray(self.tokens[a:b], dtype=np.int64)
            m = np.asarray(self.mask[a:b], dtype=bool)
            n = len(ids) - 1
            x[i, :n] = ids[:-1]
            y[i, :n] = np.where(m[1:], ids[1:], -100)
            seg[i, :n] = np.searchsorted(self.docs, np.arange(a, a + n), side="right")
            seg[i, n:] = len(self.docs) + 1
        self.step += 1
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(seg)
