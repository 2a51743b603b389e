"""Output directories written whole or not at all, and never over files xinzhou did not write.

    with atomic_dir("runs/x/data/sft", kind="shards") as tmp:
        ...  # write the files into tmp
    # runs/x/data/sft is now the new directory; the one it replaced is gone

Shards, Hugging Face checkpoints and training checkpoints (weights + optimiser state) all go
through `atomic_dir`. The order on disk, so that a complete directory is always there:
1. a temporary sibling `.NAME.tmp-<pid>-<hex>` is filled; it carries a `.xinzhou-tmp` tag
   (writer pid and host) until it is complete;
2. the manifest `.xinzhou-output.json` (kind and every file) is written, then the tag removed;
3. an existing NAME is renamed to `.NAME.old-<pid>-<hex>`, the temporary is renamed to NAME, and
   the old directory is removed. A crash between the two renames leaves the old directory,
   complete, under its `.old` name; `recover` (called by `atomic_dir` and at the start of
   training) renames it back, so a resumed run finds its last checkpoint.
`recover` also removes temporaries of interrupted writes: tagged ones whose writer process is
gone, and untagged ones (older versions of xinzhou) that hold only files of that kind's layout;
a complete temporary (manifest, no tag) whose writer died before its rename takes the place of
a missing NAME, and is removed otherwise.

A directory is replaced only when it is what xinzhou wrote: its manifest lists every file in it,
or (written before manifests existed) its files are exactly the layout of that kind. Anything
else (a file, a symlink, a folder with other files) is refused with an `OutputError` naming the
path and what is in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from xinzhou.errors import OutputError

MANIFEST = ".xinzhou-output.json"
TMP_TAG = ".xinzhou-tmp"

_CHECKPOINT_FILES = re.compile(r"config\.json|model\.safetensors|model-\d+-of-\d+\.safetensors|"
                               r"model\.safetensors\.index\.json|tokenizer\.json|trainer_state\.pt|"
                               r"train_config\.json")
# kind -> (the file names xinzhou writes there, one file every complete directory of that kind has)
LAYOUTS: dict[str, tuple[re.Pattern[str], str]] = {
    "shards": (re.compile(r"tokens\.bin|mask\.bin|docs\.npy|meta\.json"), "meta.json"),
    "checkpoint": (_CHECKPOINT_FILES, "config.json"),
}


def _files(path: Path) -> set[str]:
    """The entries of path (xinzhou's output directories are flat: a subdirectory is listed as
    "name/", which no layout or manifest allows)."""
    return {p.name + "/" if p.is_dir() and not p.is_symlink() else p.name for p in path.iterdir()}


def _few(names: set[str], n: int = 5) -> str:
    s = sorted(names)
    return ", ".join(s[:n]) + (f" and {len(s) - n} more" if len(s) > n else "")


def _manifest(path: Path) -> dict | None:
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and m.get("written_by") == "xinzhou" and isinstance(m.get("files"), list)
    return m if ok else None


def _layout_matches(files: set[str], kind: str, complete: bool = True) -> bool:
    allowed, required = LAYOUTS[kind]
    return bool(files) and all(allowed.fullmatch(f) for f in files) and (required in files or not complete)


def written_by_xinzhou(path: Path, kind: str) -> bool:
    """True when every file in the directory path is one xinzhou wrote there as `kind`."""
    files = _files(path) - {MANIFEST}
    m = _manifest(path)
    if m is not None:
        return m.get("kind") == kind and files <= set(m["files"])
    return _layout_matches(files, kind)


def check_replaceable(path: str | os.PathLike, kind: str) -> None:
    """Raise OutputError unless path is absent, an empty directory, or a `kind` directory of ours."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; xinzhou writes a new {kind} directory here and "
                          "will not replace a link (choose another output path)")
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{path}: exists and is a file; xinzhou writes a {kind} directory here and will not "
                          "replace a file (choose another output path)")
    files = _files(path)
    if not files:
        return
    m = _manifest(path)
    if m is not None and m.get("kind") != kind:
        raise OutputError(f"{path}: holds a xinzhou {m.get('kind')} directory, not {kind}; choose another output path")
    if m is not None:
        extra = files - set(m["files"]) - {MANIFEST}
        if extra:
            raise OutputError(f"{path}: holds files xinzhou did not write there ({_few(extra)}); move them away "
                              "or choose another output path")
        return
    if not _layout_matches(files, kind):
        raise OutputError(f"{path}: is not a {kind} directory written by xinzhou (it holds {_few(files)}); "
                          "refusing to replace it: choose a new or empty output path")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _writer_pid(name: str) -> int | None:
    m = re.search(r"\.(?:tmp|old)-(\d+)-[0-9a-f]+$", name)
    return int(m[1]) if m else None


def recover(path: str | os.PathLike, kind: str) -> None:
    """Finish or undo interrupted writes of the directory path (see the module docstring)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    prefix = f".{path.name}."
    siblings = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]
    olds = [p for p in siblings if p.name.startswith(prefix + "old-")]
    for old in sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True):  # newest first
        pid = _writer_pid(old.name)
        if pid is not None and _pid_alive(pid) or not written_by_xinzhou(old, kind):
            continue  # a write in progress, or not ours: leave it
        if path.exists() or path.is_symlink():
            shutil.rmtree(old)
        else:
            os.replace(old, path)  # the crash came between the two renames: put the last complete one back
    host = socket.gethostname()
    for tmp in (p for p in siblings if p.name.startswith(prefix + "tmp-")):
        pid = _writer_pid(tmp.name)
        if pid is not None and _pid_alive(pid):
            continue  # a write in progress
        try:
            tag = json.loads((tmp / TMP_TAG).read_text())
        except (OSError, ValueError):
            tag = None
        if isinstance(tag, dict):  # incomplete: remove it if its writer (on this host) is gone
            if tag.get("host") == host and isinstance(tag.get("pid"), int) and not _pid_alive(tag["pid"]):
                shutil.rmtree(tmp)
        elif _manifest(tmp) is not None and written_by_xinzhou(tmp, kind):
            if path.exists() or path.is_symlink():
                shutil.rmtree(tmp)  # complete, but the write died before its rename: superseded
            else:
                os.replace(tmp, path)  # a first write that died just before its rename
        elif _manifest(tmp) is None and _layout_matches(_files(tmp), kind, complete=False):
            shutil.rmtree(tmp)  # an untagged temporary of an older xinzhou: only files of the layout


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Yield a temporary directory; when the block ends without error it replaces path (which must
    be absent, empty, or a `kind` directory xinzhou wrote; see `check_replaceable`)."""
    if kind not in LAYOUTS:
        raise ValueError(f"kind {kind!r}: expected one of {sorted(LAYOUTS)}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise OutputError(f"{path}: cannot create its parent directory ({e.strerror}: {e.filename})") from e
    recover(path, kind)
    check_replaceable(path, kind)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        (tmp / TMP_TAG).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        yield tmp
        files = sorted(_files(tmp) - {TMP_TAG})
        (tmp / MANIFEST).write_text(json.dumps({"written_by": "xinzhou", "kind": kind, "files": files}, indent=2))
        (tmp / TMP_TAG).unlink()
        check_replaceable(path, kind)  # again: something may have appeared there while we wrote
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(path, old)
            os.replace(tmp, path)  # a crash before this line leaves `old`, complete: recover() restores it
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
