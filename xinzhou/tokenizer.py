"""Byte-level BPE tokenizer with MiniMax-M2's special tokens.

A thin typed wrapper around a Hugging Face `tokenizers.Tokenizer`. `train_tokenizer` trains a
GPT-style byte-level BPE whose pre-tokenizer first splits every digit into its own piece (so
numbers are always one token per digit) and every arithmetic operator `+ - *` into its own (so an
operator copied into tool-call markup is the same token as in the question), and reserves the M2
markers as single special tokens with fixed low ids (0..7, in `SPECIAL_TOKENS` order).
`Tokenizer.load` also reads a real MiniMax `tokenizer.json` (the markers are found by name there,
at whatever ids the file gives them).

`encode` never produces a special-token id: text that merely spells `<think>` or `[e~[` is
encoded as ordinary bytes (prompt-injection rule). Special ids are inserted only by
`chat_format.py`, which builds sequences from encoded text pieces plus `special_id(...)`.
(transformers' `PreTrainedTokenizerFast` / `AutoTokenizer` encode the same way when created with
`split_special_tokens=True` from a file this module saved; by default they match added tokens in
text.)

`IncrementalDecoder` turns ids into text as they are generated: `token_bytes` gives each id's
bytes (the inverse of the ByteLevel byte-to-character alphabet), and an incremental UTF-8 decoder
holds back a character split across tokens, so the pieces joined always equal `decode` of all the
ids. It needs a byte-level tokenizer (a ByteLevel decoder), as ours and MiniMax's are.

    from xinzhou.tokenizer import train_tokenizer, Tokenizer
    tok = train_tokenizer(open("corpus.txt"), vocab_size=8192)
    tok.save("out/")                      # out/tokenizer.json, loadable by transformers
    tok = Tokenizer.load("out/")
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]   # "".join(pieces) == tok.decode(ids)

Tests: `python -m pytest tests/test_tokenizer.py -q`.
"""

from __future__ import annotations

import codecs
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

BOS = "]~!b["  # begins the text
ROLE = "]~b]"  # opens a turn: ]~b]system, ]~b]user, ]~b]ai, ]~b]tool
EOS = "[e~["  # ends a turn; generation stops here
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<minimax:tool_call>"
TOOL_CALL_CLOSE = "</minimax:tool_call>"
PAD = "<pad>"
# The M2 markers every tokenizer must have; their order fixes ids 0..6 in trained tokenizers.
M2_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    ROLE,
    EOS,
    THINK_OPEN,
    THINK_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_CALL_CLOSE,
)
SPECIAL_TOKENS: tuple[str, ...] = (*M2_SPECIAL_TOKENS, PAD)
_BYTE_ALPHABET_SIZE = 256


class Tokenizer:
    """Encode/decode text; knows the ids of the M2 special tokens."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<in memory>") -> None:
        missing = [t for t in M2_SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"{source}: tokenizer lacks the MiniMax-M2 special tokens {missing}; "
                f"expected all of {list(M2_SPECIAL_TOKENS)} as added tokens"
            )
        # Every marker must be a *special* added token: only those are skipped by
        # encode_special_tokens, which is what keeps spelled markers in text as plain bytes.
        # (A real MiniMax file may flag some markers as non-special; re-adding keeps the id.)
        present = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is not None]
        ids_before = [backend.token_to_id(t) for t in present]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in present])
        if [backend.token_to_id(t) for t in present] != ids_before:
            raise ValueError(f"{source}: special token ids moved when flagging them special")
        backend.encode_special_tokens = True
        self._tok = backend
        self._source = source
        self._special_ids = {t: backend.token_to_id(t) for t in present}
        # What decode(skip_special=True) drops: every added token flagged special, which in a real
        # MiniMax file includes more than the M2 markers.
        self._skipped_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._bytes: list[bytes] | None = None  # token_bytes table, built on first use
        leaked = {t for t in present if set(self.encode(t)) & set(self._special_ids.values())}
        if leaked:
            raise ValueError(f"{source}: plain text {sorted(leaked)} encodes to a special id")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `path/tokenizer.json` (if `path` is a directory) or the file `path`."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json here")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON/structure
            raise ValueError(f"{file}: not a valid Hugging Face tokenizer.json ({e})") from e
        return cls(backend, source=str(file))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `directory/tokenizer.json` atomically (temp file + rename); returns its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        target = d / "tokenizer.json"
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tokenizer.json.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._tok.to_str(pretty=True))
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return target

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never a special id, whatever the text spells."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for (b"" for an id the vocabulary skips, as decode does)."""
        table = self._byte_table()
        if not 0 <= token_id < len(table):
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self._source} "
                             f"(ids 0..{len(table) - 1})")
        return table[token_id]

    def _byte_table(self) -> list[bytes]:
        if self._bytes is None:
            if not isinstance(self._tok.decoder, decoders.ByteLevel):
                raise ValueError(
                    f"{self._source}: token bytes need a byte-level BPE (a ByteLevel decoder); "
                    f"this tokenizer's decoder is {self._tok.decoder!r}")
            to_byte = _CHAR_TO_BYTE
            table = [b""] * self.vocab_size
            for token, i in self._tok.get_vocab(with_added_tokens=True).items():
                if i >= len(table):
                    table.extend([b""] * (i + 1 - len(table)))
                # The ByteLevel decoder's rule, per token: map every character back to its byte,
                # or, if any character is outside the alphabet (an added token such as "心<x>"),
                # take the token's own UTF-8 bytes.
                if all(c in to_byte for c in token):
                    table[i] = bytes(to_byte[c] for c in token)
                else:
                    table[i] = token.encode("utf-8")
            self._bytes = table
        return self._bytes

    def special_id(self, token: str) -> int:
        if token not in self._special_ids:
            raise KeyError(f"{token!r} is not a special token of {self._source}")
        return self._special_ids[token]

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._special_ids.values())

    @property
    def bos_id(self) -> int:
        return self._special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._special_ids[EOS]

    @property
    def pad_id(self) -> int:
        """`<pad>` if the tokenizer has one (ours do), else the eos id (real MiniMax files)."""
        return self._special_ids.get(PAD, self.eos_id)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self._source!r})"


class IncrementalDecoder:
    """Token ids -> text as they arrive; holds back the bytes of an incomplete UTF-8 character.

    `"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids, skip_special=...)` for any
    ids, invalid byte sequences included: both replace each maximal invalid subsequence with one
    U+FFFD (Python's "replace" handler and Rust's `from_utf8_lossy` follow the same Unicode
    practice). A special id yields its marker text, or nothing when `skip_special`. `flush` ends
    the sequence; pushing after it starts a new one, whose text `text` keeps appending. Needs a
    byte-level BPE (a ByteLevel decoder, as ours and MiniMax's files have): ValueError otherwise.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._table = tokenizer._byte_table()  # raises here, not mid-stream, if not byte-level
        self._skipped = tokenizer._skipped_ids if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []

    def push(self, token_id: int) -> str:
        """The text completed by `token_id` ("" while a character is still incomplete)."""
        if not 0 <= token_id < len(self._table):
            self._tokenizer.token_bytes(token_id)  # raises the out-of-vocabulary error
        if token_id in self._skipped:
            return ""
        return self._keep(self._utf8.decode(self._table[token_id]))

    def flush(self) -> str:
        """What is held back, at the end: an incomplete character's bytes become U+FFFD."""
        return self._keep(self._utf8.decode(b"", final=True))

    @property
    def text(self) -> str:
        """Everything `push` and `flush` returned so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def _keep(self, piece: str) -> str:
        if piece:
            self._parts.append(piece)
        return piece


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the GPT-2 ByteLevel alphabet: printable bytes stand for themselves,
    the others (space, control bytes, ...) are shifted to U+0100 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}
    return {c: b for b, c in chars.items()}


_CHAR_TO_BYTE = _byte_level_alphabet()


# Arithmetic operators stand alone. GPT-2's regex keeps a run of punctuation together, so the
# tool-call markup `<parameter name="op">+</parameter>` would train `">+</` into one token, and a
# model copying the operator of "What is 4821+37?" into its call would have to learn a mapping
# from `+` to that other token instead of copying it (the tiny speedrun model wrote "-" for "+"
# and "*" in most of its calculator calls). `/` is left out: the tasks never divide, and it
# would split every closing tag `</`.
OPERATORS = "+-*"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Digits first so "2024" becomes 2,0,2,4 and no merge can ever join digits; operators alone
    # (OPERATORS); then GPT-2's regex.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(tokenizers.Regex("[" + re.escape(OPERATORS) + "]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts`; `SPECIAL_TOKENS` get ids 0..7, in that order."""
    smallest = len(SPECIAL_TOKENS) + _BYTE_ALPHABET_SIZE
    if vocab_size < smallest:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {smallest} "
                         f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend)

