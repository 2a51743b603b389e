"""Atomic output directories: a complete directory is always on disk, interrupted writes are
recovered or cleaned at the next start, and nothing xinzhou did not write is replaced or removed."""

import json
import os
import subprocess
import sys

import pytest

from xinzhou import atomic
from xinzhou.atomic import MANIFEST, TMP_TAG, atomic_dir, check_replaceable, recover
from xinzhou.errors import OutputError


def _write(path, n: int) -> None:
    with atomic_dir(path, "shards") as tmp:
        (tmp / "meta.json").write_text(json.dumps({"n": n}))
        (tmp / "tokens.bin").write_bytes(b"\0" * n)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_crash_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    out = tmp_path / "sh"
    _write(out, 1)
    real = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the old directory moved away, before the new one moved in
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _write(out, 2)
    monkeypatch.setattr(atomic.os, "replace", real)
    assert not out.exists()  # the state a crash leaves: only `.sh.old-*` holds a complete copy
    olds = [p.name for p in tmp_path.iterdir()]
    assert len(olds) == 1 and olds[0].startswith(".sh.old-")
    # the old name carries this process's pid, which is alive: pretend the writer is gone
    os.rename(tmp_path / olds[0], tmp_path / f".sh.old-{_dead_pid()}-abcd")
    recover(out, "shards")
    assert json.loads((out / "meta.json").read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["sh"]


def test_stale_temporaries_are_removed_and_foreign_ones_kept(tmp_path):
    out = tmp_path / "ckpt"
    dead = tmp_path / f".ckpt.tmp-{_dead_pid()}-0000"
    dead.mkdir()
    (dead / TMP_TAG).write_text(json.dumps({"pid": _dead_pid(), "host": atomic.socket.gethostname()}))
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".ckpt.tmp-{os.getpid()}-1111"  # a write in progress (this process)
    live.mkdir()
    (live / TMP_TAG).write_text(json.dumps({"pid": os.getpid(), "host": atomic.socket.gethostname()}))
    legacy = tmp_path / ".ckpt.tmp-x7k2"  # written by older versions: no tag, checkpoint files only
    legacy.mkdir()
    (legacy / "trainer_state.pt").write_bytes(b"x")
    foreign = tmp_path / ".ckpt.tmp-mine"  # the same pattern, but someone else's files
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    recover(out, "checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name])
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_refusals_name_the_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="f: exists and is a file"):
        check_replaceable(tmp_path / "f", "shards")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    with pytest.raises(OutputError, match="link: is a symbolic link"):
        check_replaceable(tmp_path / "link", "shards")
    _write(tmp_path / "sh", 1)
    with pytest.raises(OutputError, match="sh: holds a xinzhou shards directory, not checkpoint"):
        check_replaceable(tmp_path / "sh", "checkpoint")
    (tmp_path / "sh" / "extra").mkdir()
    with pytest.raises(OutputError, match=r"holds files xinzhou did not write there \(extra/\)"):
        _write(tmp_path / "sh", 2)
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", 3)  # an empty directory loses nothing
    manifest = json.loads((tmp_path / "empty" / MANIFEST).read_text())
    assert manifest == {"written_by": "xinzhou", "kind": "shards", "files": ["meta.json", "tokens.bin"]}


def test_killed_just_before_the_final_rename(tmp_path):
    # a complete temporary (manifest written, tag removed) whose writer died before it moved in
    out = tmp_path / "sh"
    tmp = tmp_path / f".sh.tmp-{_dead_pid()}-2222"
    tmp.mkdir()
    (tmp / "meta.json").write_text("{}")
    (tmp / MANIFEST).write_text(json.dumps({"written_by": "xinzhou", "kind": "shards", "files": ["meta.json"]}))
    recover(out, "shards")  # no sh/: the complete temporary becomes it
    assert (out / "meta.json").exists() and [p.name for p in tmp_path.iterdir()] == ["sh"]
    _write(out, 4)
    tmp.mkdir()  # the same stale temporary, now beside a newer sh/: superseded, removed
    (tmp / "meta.json").write_text("{}")
    (tmp / MANIFEST).write_text(json.dumps({"written_by": "xinzhou", "kind": "shards", "files": ["meta.json"]}))
    recover(out, "shards")
    assert json.loads((out / "meta.json").read_text()) == {"n": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["sh"]
