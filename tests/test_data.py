"""Shards and the packed loader: deterministic, rank-sharded, resumable; bad files named."""

import json

import numpy as np
import pytest
import torch

from xinzhou.data import DataError, PackedLoader, open_shards, pack_windows, read_corpus, write_shards


def docs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        length = int(rng.integers(3, 40))
        ids = rng.integers(1, 97, length).tolist()
        mask = [0] * (length // 3) + [1] * (length - length // 3)
        yield ids, mask


@pytest.fixture
def shard(tmp_path):
    return write_shards(docs(300), tmp_path / "sh", vocab_size=97)


def test_pack_windows_keeps_documents_whole_and_covers_every_token():
    starts = np.array([0, 5, 9, 30, 31, 100, 104])  # docs of 5, 4, 21, 1, 69, 4 tokens
    w = pack_windows(starts, seq_len=16)  # windows of at most 17 tokens
    assert (w[:, 1] - w[:, 0] <= 17).all()
    covered = np.zeros(104, bool)
    for a, b in w:
        covered[a:b] = True
        long_piece = 9 < a < 30 or 31 < a < 100  # the 21- and 69-token documents are cut into pieces
        assert a in starts or long_piece
    assert covered.all()
    # the 69-token document is cut into overlapping pieces: each of its tokens is a target once
    pieces = [(a, b) for a, b in w if 31 <= a < 100]
    targets = sorted(t for a, b in pieces for t in range(a + 1, b))
    assert targets == list(range(32, 104))  # 100..103: the short document packed after the last piece


def test_loader_is_deterministic_resumable_and_rank_sharded(shard):
    one = PackedLoader(shard, seq_len=32, batch_size=4, seed=3)
    batches = [one.next_batch() for _ in range(7)]
    again = PackedLoader(shard, seq_len=32, batch_size=4, seed=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(batches, (again.next_batch() for _ in range(7))))
    # resume from a saved position
    r = PackedLoader(shard, seq_len=32, batch_size=4, seed=3)
    for _ in range(4):
        r.next_batch()
    state = r.state_dict()
    fresh = PackedLoader(shard, seq_len=32, batch_size=4, seed=3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next_batch()[0], batches[4][0])
    # two ranks of batch 2 see exactly the global batch of one rank of batch 4
    r0 = PackedLoader(shard, seq_len=32, batch_size=2, rank=0, world_size=2, seed=3)
    r1 = PackedLoader(shard, seq_len=32, batch_size=2, rank=1, world_size=2, seed=3)
    for x, _ in batches[:3]:
        assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), x)


def test_targets_follow_the_loss_mask(tmp_path):
    path = write_shards([([5, 6, 7, 8], [0, 0, 1, 1])], tmp_path / "one", vocab_size=10)
    x, y = PackedLoader(path, seq_len=6, batch_size=1).next_batch()
    assert x[0].tolist() == [5, 6, 7, 0, 0, 0]  # right-padded with pad id 0
    assert y[0].tolist() == [-100, 7, 8, -100, -100, -100]  # 6 is not learned (mask 0)


def test_epochs_cycle_with_a_new_order(shard):
    loader = PackedLoader(shard, seq_len=32, batch_size=4, seed=0)
    n = loader.steps_per_epoch
    first = [loader.next_batch()[0] for _ in range(n)]
    second = loader.next_batch()[0]
    assert loader.epoch == 1
    assert not any(torch.equal(second, f) for f in first[:1])


def test_bad_files_are_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty.txt: file is empty"):
        list(read_corpus(empty))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt: not UTF-8 text \(bad byte at offset 3\)"):
        list(read_corpus(latin))
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"text": "a"}\n{"text": "b')
    with pytest.raises(DataError, match="cut.jsonl line 2: invalid JSON"):
        list(read_corpus(cut))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"body": "a"}\n')
    with pytest.raises(DataError, match="wrong.jsonl line 1: expected a 'text' string or a 'messages' list"):
        list(read_corpus(wrong))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        list(read_corpus(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="no tokens"):
        write_shards([], tmp_path / "none", vocab_size=10)
    with pytest.raises(DataError, match="outside"):
        write_shards([([1, 99], [1, 1])], tmp_path / "big", vocab_size=10)


def test_parquet_corpus_and_damaged_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")  # a test extra; parquet reading is optional for users
    import pyarrow.parquet as pq
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["hello", "world"]}), good)
    assert list(read_corpus(good)) == ["hello", "world"]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        list(read_corpus(bad))


def test_truncated_shard_is_detected(shard):
    tokens = shard / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or mismatched"):
        open_shards(shard)
    meta = json.loads((shard / "meta.json").read_text())
    assert meta["n_docs"] == 300


def test_write_shards_replaces_only_its_own_directories(tmp_path):
    from xinzhou.errors import OutputError

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("precious")
    with pytest.raises(OutputError, match=r"corpus: is not a shards directory written by xinzhou \(it holds a\.txt\)"):
        write_shards(docs(5), corpus, vocab_size=97)
    assert (corpus / "a.txt").read_text() == "precious"
    # a shard directory is replaced: by manifest, or by the layout older versions wrote
    out = write_shards(docs(5), tmp_path / "sh", vocab_size=97)
    assert json.loads((out / ".xinzhou-output.json").read_text())["kind"] == "shards"
    write_shards(docs(7), out, vocab_size=97)
    assert open_shards(out)[3]["n_docs"] == 7
    (out / ".xinzhou-output.json").unlink()
    write_shards(docs(9), out, vocab_size=97)
    assert open_shards(out)[3]["n_docs"] == 9
    # a failure while writing leaves the old directory as it was, and no temporary
    with pytest.raises(DataError, match="outside"):
        write_shards([([1, 2], [1, 1]), ([1, 999], [1, 1])], out, vocab_size=97)
    assert open_shards(out)[3]["n_docs"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "sh"]


def test_chat_record_errors_name_file_and_line(tmp_path):
    from xinzhou.data import tokenize_docs
    from xinzhou.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world"] * 10, vocab_size=300)
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad = json.dumps({"messages": [{"role": "wizard", "content": "hi"}]})
    f = tmp_path / "chats.jsonl"
    f.write_text("\n".join([good] * 500 + [bad] + [good]) + "\n")
    with pytest.raises(DataError, match=r"chats\.jsonl line 501: messages\[0\]\.role: expected system, user, "
                                         r"assistant or tool, got 'wizard'"):
        list(tokenize_docs(read_corpus(f), tok))
    with pytest.raises(DataError, match=r"document 1: messages\[0\]\.role"):
        list(tokenize_docs(["plain text", {"messages": [{"role": "wizard", "content": "x"}]}], tok))


@pytest.mark.parametrize("meta,message", [
    ([1, 2], r"meta\.json: field 'dtype' is \[1, 2\], expected str"),
    ({"dtype": "uint16", "n_tokens": "many", "vocab_size": 97}, r"field 'n_tokens' is 'many', expected int"),
    ({"dtype": "float64", "n_tokens": 3, "vocab_size": 97}, r"dtype 'float64', expected 'uint16' or 'uint32'"),
])
def test_malformed_shard_meta_is_named(meta, message, shard):
    (shard / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=message):
        open_shards(shard)


def test_missing_shard_directory(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: no such shard directory"):
        PackedLoader(tmp_path / "nowhere", seq_len=8, batch_size=1)


def test_segment_ids_mark_each_document(tmp_path):
    path = write_shards([([1, 2, 3], [1, 1, 1]), ([4, 5], [1, 1]), ([6, 7, 8, 9], [1, 1, 1, 1])], tmp_path / "s",
                        vocab_size=10)
    x, y, seg = PackedLoader(path, seq_len=12, batch_size=1).next_packed()
    assert x[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]
    # inputs of one document share an id; the padding after the last input is a segment of its own
    s = seg[0].tolist()
    assert s[:3] == [s[0]] * 3 and s[3:5] == [s[3]] * 2 and s[5:8] == [s[5]] * 3 and s[8:] == [s[8]] * 4
    assert len({s[0], s[3], s[5], s[8]}) == 4
