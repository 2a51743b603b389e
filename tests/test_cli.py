"""The `xinzhou` command and `python -m xinzhou.train` on bad input: one line naming what is wrong
(exit 1, or argparse's exit 2 for a bad flag), no traceback unless --debug, and nothing lost."""

import json
import subprocess
import sys

import pytest

from xinzhou import train as train_mod
from xinzhou.cli import main
from xinzhou.config import preset
from xinzhou.errors import CheckpointError
from xinzhou.hf import save_hf
from xinzhou.model import XinzhouLM
from xinzhou.tokenizer import train_tokenizer


def fails(argv, capsys, entry=main, code=1) -> str:
    with pytest.raises(SystemExit) as e:
        entry(argv)
    assert e.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def tok_path(tmp_path):
    return train_tokenizer(["hello world " * 5, "the heart-boat sails"] * 20, vocab_size=300).save(tmp_path / "tok")


def test_data_never_deletes_its_input_or_the_current_directory(tmp_path, tok_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world")
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    msg = fails(["data", "corpus", "--tokenizer", str(tok_path), "--out", "."], capsys)
    assert msg == "xinzhou: error: --out . would replace the input corpus: write the shards somewhere else"
    msg = fails(["data", "corpus", "--tokenizer", str(tok_path), "--out", "corpus"], capsys)
    assert "would replace the input corpus" in msg
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.md").write_text("notes")
    msg = fails(["data", "corpus", "--tokenizer", str(tok_path), "--out", "other"], capsys)
    assert msg.startswith("xinzhou: error: other: is not a shards directory written by xinzhou (it holds x.md)")
    assert (corpus / "a.txt").read_text() == "hello world" and (tmp_path / "keep.txt").read_text() == "mine"
    assert (tmp_path / "other" / "x.md").read_text() == "notes"
    main(["data", "corpus", "--tokenizer", str(tok_path), "--out", "sh"])
    assert json.loads((tmp_path / "sh" / "meta.json").read_text())["n_docs"] == 1


def test_data_errors_name_file_and_line(tmp_path, tok_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    msg = fails(["data", str(bad), "--tokenizer", str(tok_path), "--out", str(tmp_path / "sh")], capsys)
    assert msg.startswith(f"xinzhou: error: {bad} line 2: messages[0].role: expected system, user, assistant or tool")
    assert not (tmp_path / "sh").exists()
    msg = fails(["data", str(tmp_path / "missing.txt"), "--tokenizer", str(tok_path), "--out", str(tmp_path / "sh")],
                capsys)
    assert msg == f"xinzhou: error: {tmp_path / 'missing.txt'}: no such file or directory"
    msg = fails(["data", str(bad), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "sh")], capsys)
    assert msg.endswith("no tokenizer.json there (a speedrun writes one into every checkpoint)")


def test_eval_errors(tmp_path, capsys):
    assert fails(["eval", str(tmp_path / "nowhere")], capsys) == \
        f"xinzhou: error: {tmp_path / 'nowhere'}: no such checkpoint directory"
    (tmp_path / "empty").mkdir()
    assert "empty/config.json: not found" in fails(["eval", str(tmp_path / "empty")], capsys)
    save_hf(XinzhouLM(preset("tiny", vocab_size=300)), tmp_path / "ck")
    msg = fails(["eval", str(tmp_path / "ck")], capsys)
    assert msg == f"xinzhou: error: {tmp_path / 'ck' / 'tokenizer.json'}: no tokenizer.json there " \
                  "(a speedrun writes one into every checkpoint)"
    assert fails(["eval", str(tmp_path / "ck"), "-n", "-1"], capsys, code=2) == \
        "xinzhou eval: error: argument -n: -1: must be at least 1"
    (tmp_path / "report.md").write_text("my own report")
    train_tokenizer(["hello"] * 10, vocab_size=300).save(tmp_path / "ck")
    msg = fails(["eval", str(tmp_path / "ck")], capsys)  # the report would go to ck's parent
    assert msg == f"xinzhou: error: {tmp_path / 'report.md'}: exists and is not a xinzhou capability report; " \
                  "choose another --out"
    assert (tmp_path / "report.md").read_text() == "my own report"
    with pytest.raises(CheckpointError):  # --debug: the exception itself, with its traceback
        main(["eval", str(tmp_path / "nowhere"), "--debug"])


def test_speedrun_out_must_be_a_directory(tmp_path, capsys):
    (tmp_path / "F").write_text("x")
    assert fails(["speedrun", "--out", str(tmp_path / "F")], capsys) == \
        f"xinzhou: error: {tmp_path / 'F'}: exists and is a file; --out must be a directory"
    assert (tmp_path / "F").read_text() == "x"


def test_train_errors_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    msg = fails(["--data", str(tmp_path / "nowhere"), "--out", str(out), "--preset", "tiny"], capsys,
                entry=train_mod.main)
    assert msg == f"xinzhou: error: {tmp_path / 'nowhere'}: no such shard directory (write one with `xinzhou data`)"
    assert not out.exists()
    msg = fails(["--data", str(tmp_path), "--out", str(out), "--preset", "tiny", "--steps", "0"], capsys,
                entry=train_mod.main, code=2)
    assert msg.endswith("steps = 0: must be >= 1")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(Exception, match=r"mine: holds files that are not a xinzhou training run \(thesis\.tex\)"):
        train_mod.train(preset("tiny"), train_mod.TrainConfig(data=str(tmp_path), out_dir=str(tmp_path / "mine")))


def test_one_line_without_a_traceback_from_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "xinzhou.cli", "eval", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr == f"xinzhou: error: {tmp_path / 'nowhere'}: no such checkpoint directory\n"
