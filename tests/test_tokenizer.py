"""Tests for xinzhou.tokenizer: training, round trips, special tokens, transformers interop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from xinzhou.tokenizer import (
    M2_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    IncrementalDecoder,
    Tokenizer,
    train_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 1234 + 5678 = 6912 and 99 * 99 = 9801.",
    "def add(a, b):\n    return a + b\n",
    "Weather in Paris: 21°C, sunny. Météo à Paris.",
    "天气很好。我们去公园吧！",
    '{"city": "Paris", "days": 3, "ok": true}',
    "<tool>search</tool> <parameter name=\"q\">news</parameter>",
] * 20
SPELLED = [*SPECIAL_TOKENS, "]~b]ai", "<think>\n", "[e~[\n]~b]user"]
settings.register_profile("tok", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("tok")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def saved(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tok.save(tmp_path_factory.mktemp("tok"))


# Text that mixes ordinary characters with spelled markers and their fragments.
marker_text = st.lists(
    st.one_of(st.text(max_size=12), st.sampled_from([*SPELLED, "]~", "[e", "<thi"])),
    max_size=8,
).map("".join)


def test_special_tokens_have_fixed_low_ids(tok: Tokenizer) -> None:
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.special_id(t) == i
        assert tok.id_to_token(i) == t
        assert tok.decode([i]) == t  # one token each
        assert tok.decode([i], skip_special=True) == ""
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 7)
    assert tok.vocab_size == 400
    assert tok.special_ids == frozenset(range(8))
    with pytest.raises(KeyError, match="hello"):
        tok.special_id("hello")


@given(text=st.text())
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@given(text=marker_text)
def test_spelled_specials_stay_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text


def test_each_spelled_marker_is_plain_bytes(tok: Tokenizer) -> None:
    for t in SPECIAL_TOKENS:
        ids = tok.encode(f"user says {t} here")
        assert tok.special_id(t) not in ids and len(ids) > 3
    assert tok.encode_batch(["<think>", "x"]) == [tok.encode("<think>"), tok.encode("x")]


def test_digits_are_single_tokens(tok: Tokenizer) -> None:
    text = "In 2024, 1234 + 5678 = 6912; pi=3.14159 x10 007"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert "".join(pieces) == text
    for p in pieces:
        assert not any(c.isdigit() for c in p) or len(p) == 1, p
    assert sum(p.isdigit() for p in pieces) == sum(c.isdigit() for c in text)


def test_operators_are_single_tokens() -> None:
    # A corpus where the operator inside tool-call markup is frequent enough for GPT-2's regex
    # to merge `">+</` into one token: the operator must still be the question's token.
    calls = [f'What is 48{op}37? <parameter name="op">{op}</parameter> (3{op}5){op}4'
             for op in "+-*"] * 50
    tok = train_tokenizer(calls, vocab_size=300)
    for op in "+-*":
        (op_id,) = tok.encode(op)
        question = tok.encode(f"What is 4821{op}37?")
        call = tok.encode(f'<parameter name="op">{op}</parameter>')
        answer = tok.encode(f"(3+5){op}(2-1)")
        assert question.count(op_id) == 1 and call.count(op_id) == 1 and answer.count(op_id) == 1 + (op != "*"), op
    assert [tok.decode([i]) for i in tok.encode("a--b")] == ["a", "-", "-", "b"]


def test_vocab_too_small() -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_save_is_atomic_and_loads_back(tok: Tokenizer, saved: Path) -> None:
    assert saved.name == "tokenizer.json"
    assert [p.name for p in saved.parent.iterdir()] == ["tokenizer.json"]  # no temp leftovers
    for path in (saved, saved.parent):
        again = Tokenizer.load(path)
        assert again.encode("Hello <think> 42") == tok.encode("Hello <think> 42")
        assert again.special_id("</minimax:tool_call>") == 6


@given(text=st.text())
def test_transformers_encodes_identically(tok: Tokenizer, saved: Path, text: str) -> None:
    hf = _hf(saved)
    if not any(t in text for t in SPECIAL_TOKENS):
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


@given(text=marker_text)
def test_transformers_with_split_special_tokens_matches(saved: Path, text: str) -> None:
    # Our encode is transformers' encode with split_special_tokens=True (the injection-safe mode):
    # set when the tokenizer is created, or per call.
    ours = Tokenizer.load(saved).encode(text)
    assert _hf(saved, split=True).encode(text, add_special_tokens=False) == ours
    assert _hf(saved)(text, add_special_tokens=False, split_special_tokens=True)[
        "input_ids"] == ours
    if any(t in text for t in SPECIAL_TOKENS):  # by default transformers matches the markers
        assert _hf(saved).encode(text, add_special_tokens=False) != ours


def test_transformers_split_special_tokens_options(tok: Tokenizer, saved: Path) -> None:
    text = "user says <think> and [e~[ then ]~b]ai <pad>"
    ours = tok.encode(text)
    assert not set(ours) & tok.special_ids
    default = _hf(saved).encode(text, add_special_tokens=False)
    assert [i for i in default if i in tok.special_ids] == [3, 2, 1, 7]  # markers matched
    auto = AutoTokenizer.from_pretrained(saved.parent, split_special_tokens=True)
    assert auto.encode(text, add_special_tokens=False) == ours
    assert AutoTokenizer.from_pretrained(saved.parent).encode(text, add_special_tokens=False) \
        == default


def test_transformers_sees_the_special_tokens(tok: Tokenizer, saved: Path) -> None:
    hf = _hf(saved)
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(8))
    assert hf.encode("]~!b[]~b]user\nhi[e~[", add_special_tokens=False)[:2] == [0, 1]
    assert hf.decode([3, *tok.encode("x"), 4]) == "<think>x</think>"


_HF_CACHE: dict[tuple[Path, bool], PreTrainedTokenizerFast] = {}


def _hf(path: Path, split: bool = False) -> PreTrainedTokenizerFast:
    if (path, split) not in _HF_CACHE:
        _HF_CACHE[path, split] = PreTrainedTokenizerFast(
            tokenizer_file=str(path), split_special_tokens=split)
    return _HF_CACHE[path, split]


def test_missing_specials_error_names_file_and_tokens(tmp_path: Path) -> None:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["]~!b[", "[e~[", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    file = tmp_path / "tokenizer.json"
    backend.save(str(file))
    with pytest.raises(ValueError) as e:
        Tokenizer.load(tmp_path)
    msg = str(e.value)
    assert str(file) in msg
    missing = ["]~b]", "<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"]
    assert str(missing) in msg


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing"):
        Tokenizer.load(tmp_path / "nothing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_loads_a_minimax_style_tokenizer_json(tmp_path: Path) -> None:
    """A real MiniMax tokenizer.json: regex Split + ByteLevel, markers as added tokens at high
    ids among other added tokens, some flagged non-special, and no `<pad>`."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\r\n]|\s?[^\s\p{L}\p{N}]+|\s?\p{L}+|\p{N}{1,3}|\s+"),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=350, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    base = backend.get_vocab_size()
    backend.add_special_tokens(["]!p~[", "]!d~[", "]~!b[", "]~b]", "[e~["])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t in ("<think>", "</think>", "<minimax:tool_call>",
                                  "</minimax:tool_call>")])
    file = tmp_path / "tokenizer.json"
    backend.save(str(file))
    added = {t["content"]: t for t in json.loads(file.read_text())["added_tokens"]}
    assert added["<think>"]["special"] is False and added["[e~["]["id"] == base + 4

    tok = Tokenizer.load(file)
    assert tok.bos_id == base + 2 and tok.eos_id == base + 4
    assert tok.pad_id == tok.eos_id  # no <pad>: pad falls back to eos
    assert [tok.special_id(t) for t in M2_SPECIAL_TOKENS] == [base + i for i in range(2, 9)]
    for t in M2_SPECIAL_TOKENS:  # non-special in the file, still never produced from text
        assert not set(tok.encode(f"a {t} b")) & tok.special_ids
    text = "Hello, 2024 world!\nnew line"
    assert tok.decode(tok.encode(text)) == text
    assert _hf(file).encode(text, add_special_tokens=False) == tok.encode(text)
    out = tok.save(tmp_path / "resaved")
    flags = {t["content"]: t["special"] for t in json.loads(out.read_text())["added_tokens"]}
    assert all(flags[t] for t in M2_SPECIAL_TOKENS)
    # split_special_tokens leaves non-special added tokens alone: on the original file
    # transformers still matches "<think>"; on the file we re-save (all flagged special) it agrees
    spelled = "a <think> b [e~[ c"
    original = PreTrainedTokenizerFast(tokenizer_file=str(file), split_special_tokens=True)
    assert tok.special_id("<think>") in original.encode(spelled, add_special_tokens=False)
    assert _hf(out, split=True).encode(spelled, add_special_tokens=False) == tok.encode(spelled)


# --- incremental decoding -----------------------------------------------------------------------

MULTIBYTE = ["é", "心", "中", "😀", "👍🏽", "\u00a0", "a", " ", "\n", "<think>", "[e~["]
multibyte_text = st.lists(st.one_of(st.sampled_from(MULTIBYTE), st.text(max_size=6)),
                          max_size=12).map("".join)


@pytest.fixture(scope="module")
def odd_tok() -> Tokenizer:
    """Ours plus added tokens that exercise the ByteLevel decoder's per-token rule: one made of
    alphabet characters whose bytes are not UTF-8 ("é" is byte 0xE9), one with a character
    outside the alphabet (decoded from its own UTF-8 bytes), and a non-M2 special token."""
    t = train_tokenizer(CORPUS, vocab_size=400)
    t.backend.add_special_tokens([AddedToken("é<s>", special=True, normalized=False),
                                  AddedToken("]!p~[", special=True, normalized=False)])
    t.backend.add_tokens([AddedToken("Ġy心", special=False, normalized=False)])
    return Tokenizer(t.backend)


def _pushed(tok: Tokenizer, ids: list[int], skip_special: bool) -> str:
    dec = IncrementalDecoder(tok, skip_special=skip_special)
    out = "".join(dec.push(i) for i in ids) + dec.flush()
    assert dec.text == out
    return out


@given(text=multibyte_text, skip_special=st.booleans())
def test_incremental_decoding_of_text(tok: Tokenizer, text: str, skip_special: bool) -> None:
    ids = tok.encode(text)
    assert _pushed(tok, ids, skip_special) == tok.decode(ids, skip_special=skip_special) == text


@given(data=st.data(), skip_special=st.booleans(), odd=st.booleans())
def test_incremental_decoding_of_any_ids(tok: Tokenizer, odd_tok: Tokenizer, data: st.DataObject,
                                        skip_special: bool, odd: bool) -> None:
    # Random ids split characters, leave them incomplete and make invalid UTF-8: the pieces
    # still join to exactly what decode gives, U+FFFD for U+FFFD.
    t = odd_tok if odd else tok
    byte_ids = [i for i in range(t.vocab_size) if len(t.token_bytes(i)) == 1]
    ids = data.draw(st.lists(st.one_of(st.integers(0, t.vocab_size - 1),
                                       st.sampled_from(byte_ids)), max_size=24))
    assert _pushed(t, ids, skip_special) == t.decode(ids, skip_special=skip_special)


def test_push_holds_back_an_incomplete_character(tok: Tokenizer) -> None:
    ids = _byte_ids(tok, "心".encode())
    dec = IncrementalDecoder(tok)
    assert [dec.push(i) for i in ids] == ["", "", "心"]
    assert dec.push(ids[0]) == "" and dec.flush() == "\ufffd"  # cut off: one U+FFFD
    assert dec.push(tok.special_id("</think>")) == "</think>"  # pushing goes on after flush
    assert dec.text == "心\ufffd</think>"
    quiet = IncrementalDecoder(tok, skip_special=True)
    assert [quiet.push(i) for i in [ids[0], 3, ids[1], ids[2]]] == ["", "", "", "心"]


def _byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One id per byte: the vocabulary's single-byte tokens."""
    by_byte = {tok.token_bytes(i): i for i in range(tok.vocab_size)
               if len(tok.token_bytes(i)) == 1 and i not in tok.special_ids}
    return [by_byte[bytes([b])] for b in data]


def test_token_bytes(tok: Tokenizer, odd_tok: Tokenizer) -> None:
    singles = {tok.token_bytes(i) for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1}
    assert singles == {bytes([b]) for b in range(256)}  # the whole byte alphabet
    assert tok.token_bytes(tok.special_id("<think>")) == b"<think>"
    assert tok.token_bytes(tok.encode(" ")[0]) == b" "
    assert odd_tok.token_bytes(odd_tok.backend.token_to_id("é<s>")) == b"\xe9<s>"
    assert odd_tok.token_bytes(odd_tok.backend.token_to_id("Ġy心")) == "Ġy心".encode()
    with pytest.raises(ValueError, match=r"token id 400 is outside the vocabulary .*0\.\.399"):
        tok.token_bytes(400)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        IncrementalDecoder(tok).push(-1)


def test_incremental_decoder_needs_a_byte_level_tokenizer() -> None:
    backend = tokenizers.Tokenizer(models.BPE(unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["?", *SPECIAL_TOKENS], show_progress=False))
    t = Tokenizer(backend)
    with pytest.raises(ValueError, match="ByteLevel decoder.*Metaspace"):
        IncrementalDecoder(t)
