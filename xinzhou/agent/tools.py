"""Tools for the agent (and the capability tasks): small classes with a name, a description, a
JSON schema of their parameters, and a `run` that reports failure as data, never by raising.

    ws = Workspace("work/")                        # everything below happens inside work/
    tools = default_tools(ws)                      # bash, read_file, write_file, edit_file, calculator
    result = tools["read_file"]({"path": "notes.md"})   # ToolResult(ok=True, content="...")
    specs = [t.spec() for t in tools.values()]     # OpenAI-style tool definitions for the model

Trust model (enforced here, stated in the README):
- File tools see only the workspace: absolute paths, `..`, symbolic links that lead outside and
  files with more than one hard link (one may live outside) are refused.
- `bash` runs the model's command with `bash -c COMMAND` as its own argv entry (the agent never
  builds a shell string from arguments), the workspace as cwd, a timeout after which its whole
  process group is killed, and output capped at `max_output` characters.
- Every result is capped; a tool error is a result with ok=False that the model reads and the
  loop goes on.
"""

from __future__ import annotations

import abc
import ast
import json
import operator
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xinzhou.schema import argument_error

MAX_OUTPUT = 20_000  # characters a tool result keeps (head and tail)


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    content: str


def cap(text: str, limit: int = MAX_OUTPUT) -> str:
    """text, or its head and tail with the number of characters cut between them."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


class Tool(abc.ABC):
    """A tool: `name`, `description`, `parameters` (a JSON object schema) and `execute`."""

    name: str = ""
    description: str = ""
    parameters: dict[str, Any] = {"type": "object", "properties": {}}

    def spec(self) -> dict[str, Any]:
        """The OpenAI-style definition the chat format and the server take."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, arguments: object) -> ToolResult:
        """Check the arguments against the schema, run, and turn any failure into a result."""
        if isinstance(arguments, str):  # OpenAI wire format: a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return ToolResult(False, f"error: arguments are not valid JSON ({e.msg})")
        err = argument_error(arguments, self.parameters)
        if err is not None:
            return ToolResult(False, f"error: {err}")
        try:
            return self.execute(**arguments)  # type: ignore[arg-type]
        except ToolError as e:
            return ToolResult(False, f"error: {e}")
        except (OSError, ValueError, ArithmeticError, RecursionError) as e:
            return ToolResult(False, f"error: {type(e).__name__}: {e}")

    @abc.abstractmethod
    def execute(self, **arguments: Any) -> ToolResult:
        """Run with arguments already checked against `parameters`; raise ToolError for the model to read."""


class ToolError(Exception):
    """A failure the model should read (bad path, timeout, ...)."""


class Workspace:
    """A directory the file tools and bash are confined to."""

    def __init__(self, root: str | os.PathLike) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"{root}: the workspace must be an existing directory")
        self.root = root.resolve()

    def resolve(self, path: str, *, must_exist: bool = False) -> Path:
        """The workspace path `path` names, or ToolError if it is, or leads, outside."""
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path must be a non-empty relative path inside the workspace")
        p = Path(path)
        if p.is_absolute():
            raise ToolError(f"{path}: absolute paths are not allowed; give a path relative to the workspace")
        if ".." in p.parts:
            raise ToolError(f"{path}: '..' is not allowed; paths stay inside the workspace")
        full = self.root / p
        real = full.resolve()  # follows every symbolic link on the way
        if real != self.root and self.root not in real.parents:
            raise ToolError(f"{path}: leads outside the workspace (through a symbolic link)")
        if must_exist and not real.exists():
            raise ToolError(f"{path}: no such file")
        if real.is_file() and real.stat().st_nlink > 1:
            raise ToolError(f"{path}: has several hard links (one may be outside the workspace); refused")
        return real


class ReadFile(Tool):
    name = "read_file"
    description = "Read a text file of the workspace (optionally a range of lines)."
    parameters = {"type": "object", "properties": {
        "path": {"type": "string", "description": "relative to the workspace"},
        "offset": {"type": "integer", "description": "first line, 1-based"},
        "limit": {"type": "integer", "description": "number of lines"}}, "required": ["path"]}

    def __init__(self, workspace: Workspace, max_output: int = MAX_OUTPUT) -> None:
        self.ws, self.max_output = workspace, max_output

    def execute(self, path: str, offset: int = 1, limit: int | None = None) -> ToolResult:
        f = self.ws.resolve(path, must_exist=True)
        if not f.is_file():
            raise ToolError(f"{path}: not a file")
        lines = f.read_text(errors="replace").splitlines(keepends=True)
        start = max(offset, 1) - 1
        chosen = lines[start:start + limit] if limit is not None else lines[start:]
        return ToolResult(True, cap("".join(chosen), self.max_output))


class WriteFile(Tool):
    name = "write_file"
    description = "Write a text file in the workspace (created or replaced; folders are created)."
    parameters = {"type": "object", "properties": {
        "path": {"type": "string"}, "content": {"type": "string"}}, "required": ["path", "content"]}

    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace

    def execute(self, path: str, content: str) -> ToolResult:
        f = self.ws.resolve(path)
        if f.is_dir():
            raise ToolError(f"{path}: is a directory")
        f.parent.mkdir(parents=True, exist_ok=True)
        self.ws.resolve(path)  # again: a folder created on the way cannot be a link out
        fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=f".{f.name}.")
        with os.fdopen(fd, "w") as out:
            out.write(content)
        os.replace(tmp, f)
        return ToolResult(True, f"wrote {len(content)} characters to {path}")


class EditFile(Tool):
    name = "edit_file"
    description = "Replace one exact occurrence of old_text with new_text in a workspace file."
    parameters = {"type": "object", "properties": {
        "path": {"type": "string"}, "old_text": {"type": "string"}, "new_text": {"type": "string"}},
        "required": ["path", "old_text", "new_text"]}

    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace

    def execute(self, path: str, old_text: str, new_text: str) -> ToolResult:
        f = self.ws.resolve(path, must_exist=True)
        text = f.read_text()
        n = text.count(old_text) if old_text else 0
        if n != 1:
            raise ToolError(f"{path}: old_text occurs {n} times; it must occur exactly once")
        return WriteFile(self.ws).execute(path, text.replace(old_text, new_text, 1))


class Bash(Tool):
    name = "bash"
    description = "Run a bash command in the workspace; returns exit status and output."
    parameters = {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}

    def __init__(self, workspace: Workspace, timeout_s: float = 30.0, max_output: int = MAX_OUTPUT) -> None:
        self.ws, self.timeout_s, self.max_output = workspace, timeout_s, max_output

    def execute(self, command: str) -> ToolResult:
        # a new process session: on timeout the whole group (children, pipes, background jobs) is killed
        proc = subprocess.Popen(["bash", "-c", command], cwd=self.ws.root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                text=True, errors="replace")
        try:
            out, _ = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return ToolResult(False, f"error: timed out after {self.timeout_s:g} s (killed)\n"
                                     + cap(out or "", self.max_output))
        return ToolResult(proc.returncode == 0, f"exit status {proc.returncode}\n" + cap(out, self.max_output))


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


class Calculator(Tool):
    name = "calculator"
    description = "Evaluate an arithmetic expression (+ - * / // % ** and parentheses)."
    parameters = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}

    def execute(self, expression: str) -> ToolResult:
        if len(expression) > 500:
            raise ToolError("expression longer than 500 characters")
        try:
            tree = ast.parse(expression, mode="eval")
        except SyntaxError as e:
            raise ToolError(f"not an arithmetic expression ({e.msg})") from None
        return ToolResult(True, repr(self._eval(tree.body)))

    def _eval(self, node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self._eval(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 10**6):
                raise ToolError("power too large")
            v = _OPS[type(node.op)](a, b)
            if isinstance(v, int) and abs(v) > 10**100:
                raise ToolError("result too large")
            return v
        raise ToolError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


class TaskCalculator(Tool):
    """The capability tasks' calculator: a op b on integers (L4)."""

    name = "calculator"
    description = "Compute a op b."
    parameters = {"type": "object", "properties": {
        "a": {"type": "integer"}, "op": {"type": "string", "enum": ["+", "-", "*"]}, "b": {"type": "integer"}},
        "required": ["a", "op", "b"]}

    def execute(self, a: int, op: str, b: int) -> ToolResult:
        if max(abs(a), abs(b)) >= 10**12:  # keeps results small: this is a demo calculator
            raise ToolError("operands must be below 10**12")
        return ToolResult(True, str(a + b if op == "+" else a - b if op == "-" else a * b))


class GetPrice(Tool):
    """The capability tasks' catalogue lookup: the price of an item times a quantity (L4)."""

    name = "get_price"
    description = "Total price of a quantity of an item."
    parameters = {"type": "object", "properties": {"item": {"type": "string"}, "quantity": {"type": "integer"}},
                  "required": ["item", "quantity"]}

    def __init__(self, prices: Mapping[str, int]) -> None:
        self.prices = prices

    def execute(self, item: str, quantity: int) -> ToolResult:
        key = item.strip().lower()
        if key not in self.prices:
            raise ToolError(f"unknown item {item!r}")
        return ToolResult(True, str(self.prices[key] * quantity))


def default_tools(workspace: Workspace, timeout_s: float = 30.0) -> dict[str, Tool]:
    tools: list[Tool] = [Bash(workspace, timeout_s), ReadFile(workspace), WriteFile(workspace),
                         EditFile(workspace), Calculator()]
    return {t.name: t for t in tools}
