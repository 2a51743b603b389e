"""Agent tools: every way out of the workspace and every hang fails as a tool error (data, not an
exception), output is capped, and nothing outside a temporary directory is touched."""

import os
import time

import pytest

from xinzhou.agent.tools import MAX_OUTPUT, Bash, Calculator, ToolResult, Workspace, cap, default_tools


@pytest.fixture
def env(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret")
    (ws / "notes.md").write_text("line 1\nline 2\nline 3\n")
    return Workspace(ws), ws, outside


def test_file_tools_work_inside(env):
    w, ws, _ = env
    t = default_tools(w)
    assert t["read_file"]({"path": "notes.md", "offset": 2, "limit": 1}) == ToolResult(True, "line 2\n")
    assert t["write_file"]({"path": "sub/new.txt", "content": "hello"}).ok
    assert (ws / "sub" / "new.txt").read_text() == "hello"
    assert t["edit_file"]({"path": "sub/new.txt", "old_text": "hello", "new_text": "bye"}).ok
    assert (ws / "sub" / "new.txt").read_text() == "bye"
    r = t["edit_file"]({"path": "notes.md", "old_text": "line", "new_text": "x"})
    assert not r.ok and "occurs 3 times" in r.content
    assert t["read_file"]('{"path": "notes.md"}').content.startswith("line 1")  # JSON-string arguments


@pytest.mark.parametrize("make,path,message", [
    (None, "/etc/passwd", "absolute paths are not allowed"),
    (None, "../secret.txt", "'..' is not allowed"),
    (None, "sub/../../secret.txt", "'..' is not allowed"),
    ("symlink_file", "link.txt", "leads outside the workspace"),
    ("symlink_dir", "out/secret.txt", "leads outside the workspace"),
    ("hardlink", "hard.txt", "several hard links"),
])
def test_every_escape_is_a_tool_error(env, make, path, message):
    w, ws, outside = env
    if make == "symlink_file":
        (ws / "link.txt").symlink_to(outside)
    elif make == "symlink_dir":
        (ws / "out").symlink_to(outside.parent)
    elif make == "hardlink":
        os.link(outside, ws / "hard.txt")
    t = default_tools(w)
    for name, args in (("read_file", {"path": path}), ("write_file", {"path": path, "content": "pwned"}),
                       ("edit_file", {"path": path, "old_text": "top", "new_text": "pwned"})):
        r = t[name](args)
        assert not r.ok and message in r.content, (name, r)
    assert outside.read_text() == "top secret"


def test_bash_runs_in_the_workspace_and_is_killed_on_timeout(env):
    w, ws, _ = env
    bash = Bash(w, timeout_s=1.0)
    r = bash({"command": "pwd; ls"})
    assert r.ok and str(ws.resolve()) in r.content and "notes.md" in r.content
    assert not bash({"command": "exit 3"}).ok
    t0 = time.time()
    r = bash({"command": "sleep 30 & sleep 30; echo never"})  # a child in the background too
    assert time.time() - t0 < 10
    assert not r.ok and "timed out after 1 s" in r.content and "never" not in r.content
    big = bash({"command": "yes x | head -c 100000"})
    assert len(big.content) < MAX_OUTPUT + 200 and "characters cut" in big.content
    # the command is one argv entry: shell metacharacters in it are the model's own command,
    # and a value the agent passes never becomes shell syntax of another command
    assert bash({"command": "echo '$(rm -rf /)'"}).content.endswith("$(rm -rf /)\n")


def test_calculator_is_arithmetic_only():
    c = Calculator()
    assert c({"expression": "2 + 3 * (4 - 1) ** 2"}).content == "29"
    assert c({"expression": "7 / 2"}).content == "3.5"
    for bad in ("__import__('os').system('ls')", "x + 1", "9 ** 9 ** 9", "1 / 0", "[1, 2]"):
        r = c({"expression": bad})
        assert not r.ok and r.content.startswith("error:"), bad
    assert not c({"expr": "1"}).ok  # schema checked first


def test_cap_keeps_head_and_tail():
    text = "a" * 50 + "b" * 50
    assert cap(text, 20) == "a" * 10 + "\n[... 80 characters cut ...]\n" + "b" * 10
    assert cap("short", 20) == "short"
