"""The agent loop, as a generator of events: ask the model, run the tools it calls, send the
results back with its thinking, until it answers without calling a tool.

    for ev in run(client, "What do 3 pens cost?", tools):
        print(ev)          # Thinking, Text, ToolCallEvent, ToolResultEvent, Summarized, Error, Final

Only the command line renders events. A tool failure is a result the model reads (the loop goes
on); an endpoint failure is an Error event and ends the run. When the history nears the model's
context (`context_chars`, a character budget standing in for tokens, since the endpoint's tokenizer
is not known here), the oldest turns are summarised by the model into one message, and a
Summarized event says so.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from xinzhou.agent.client import Client, History, ToolOutput, Turn
from xinzhou.agent.tools import Tool, ToolResult


@dataclass(frozen=True)
class Thinking:
    text: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    id: str
    name: str
    arguments: object


@dataclass(frozen=True)
class ToolResultEvent:
    id: str
    name: str
    ok: bool
    content: str


@dataclass(frozen=True)
class Summarized:
    turns: int  # history entries folded into the summary
    summary: str


@dataclass(frozen=True)
class Error:
    message: str
    cause: str = "endpoint"  # "endpoint" (a request failed), "summary" (summarising failed), "steps" (max_steps)
    history: History = field(default_factory=list)  # the conversation so far


@dataclass(frozen=True)
class Final:
    content: str
    steps: int
    history: History


Event = Thinking | Text | ToolCallEvent | ToolResultEvent | Summarized | Error | Final


def _size(history: History) -> int:
    n = 0
    for h in history:
        if isinstance(h, str):
            n += len(h)
        elif isinstance(h, ToolOutput):
            n += len(h.content)
        else:
            n += len(h.reasoning) + len(h.content) + sum(len(str(c.arguments)) for c in h.tool_calls)
    return n


def _summarize(client: Client, history: History, keep_last: int) -> tuple[History, Summarized] | None:
    """Fold all but the task and the last `keep_last` entries into one user message written by the model."""
    cut = len(history) - keep_last
    while cut > 1 and isinstance(history[cut], ToolOutput):
        cut -= 1  # never separate tool results from the turn that called them
    if cut <= 1:
        return None
    old = history[1:cut]
    lines = []
    for h in old:
        if isinstance(h, str):
            lines.append(f"user: {h}")
        elif isinstance(h, ToolOutput):
            lines.append(f"tool {h.name}: {h.content[:2000]}")
        else:
            calls = "; ".join(f"{c.name}({c.arguments})" for c in h.tool_calls)
            lines.append(f"assistant: {h.content}" + (f" [called {calls}]" if calls else ""))
    turn = client.complete(["Summarise this work so far in a few sentences, keeping every result that "
                            "matters:\n" + "\n".join(lines)], tools=[])
    summary = turn.content.strip() or "\n".join(lines)[-2000:]
    new = [history[0], f"Summary of the earlier steps: {summary}", *history[cut:]]
    return new, Summarized(len(old), summary)


def run(client: Client, task: str | History, tools: Mapping[str, Tool], *, max_steps: int = 8,
        system: str | None = None, context_chars: int | None = None) -> Iterator[Event]:
    """Run the task to a final answer (or max_steps model calls); yields events as they happen."""
    history: History = [task] if isinstance(task, str) else list(task)
    specs = [t.spec() for t in tools.values()]
    for step in range(1, max_steps + 1):
        if context_chars is not None and _size(history) > 0.8 * context_chars:
            try:
                folded = _summarize(client, history, keep_last=4)
            except Exception as e:  # noqa: BLE001 - any endpoint failure ends the run as an event
                yield Error(f"summarising the history failed: {type(e).__name__}: {e}", "summary", history)
                return
            if folded is not None:
                history, ev = folded
                yield ev
        try:
            turn: Turn = client.complete(history, specs, system=system)
        except Exception as e:  # noqa: BLE001 - the SDKs raise many types; the caller reads an event
            yield Error(f"{client.protocol} request failed: {type(e).__name__}: {e}", "endpoint", history)
            return
        history.append(turn)
        if turn.reasoning:
            yield Thinking(turn.reasoning)
        if turn.content:
            yield Text(turn.content)
        if not turn.tool_calls:
            yield Final(turn.content, step, history)
            return
        for call in turn.tool_calls:
            yield ToolCallEvent(call.id, call.name, call.arguments)
            tool = tools.get(call.name)
            result = (tool(call.arguments) if tool is not None else
                      ToolResult(False, f"error: unknown tool {call.name!r}; available: {list(tools)}"))
            history.append(ToolOutput(call.id, call.name, result.content, result.ok))
            yield ToolResultEvent(call.id, call.name, result.ok, result.content)
    yield Error(f"no final answer after {max_steps} model calls", "steps", history)
