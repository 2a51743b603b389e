"""One client per wire protocol, over the real `openai` and `anthropic` SDKs, for any compatible
endpoint (xinzhou serve, MiniMax's API, vLLM, SGLang).

The agent keeps its history protocol-neutral (`Turn`s and tool results); each client turns it into
its protocol's request, sending the model's earlier thinking back in that protocol's own form:
- "openai" (Chat Completions): `reasoning_split` asked for, thinking returned and sent back as
  `reasoning_details` (and read from `reasoning_content` or inline `<think>` if a server does that);
- "responses" (OpenAI Responses, stateless): the `reasoning` output items sent back in `input`;
- "anthropic" (Messages): `thinking` blocks with their signature sent back as they came.
`keep_thinking=False` drops it instead (the ablation of the MiniMax-M2 report).

    client = make_client("anthropic", "http://127.0.0.1:8000", model="xinzhou", api_key="k")
    turn = client.complete(history, tools, system="...")
"""

from __future__ import annotations

import abc
import json
import re
from dataclasses import dataclass, field
from typing import Any

PROTOCOLS = ("openai", "responses", "anthropic")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any] | str  # a dict, or the raw text when it was not a JSON object


@dataclass
class Turn:
    """One assistant turn, whatever the protocol."""
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    native: list[dict] = field(default_factory=list)  # the protocol's own items/blocks, sent back as they came
    usage: dict[str, int] = field(default_factory=dict)
    finish: str = ""


@dataclass
class ToolOutput:
    call_id: str
    name: str
    content: str
    ok: bool = True


History = list["str | Turn | ToolOutput"]  # user text, assistant turns, tool results, in order

_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)


def _split_inline(content: str) -> tuple[str, str]:
    m = _THINK.match(content or "")
    return (m[1].strip("\n"), content[m.end():]) if m else ("", content or "")


def _args(text: str) -> dict[str, Any] | str:
    try:
        v = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return text
    return v if isinstance(v, dict) else text


def _get(obj: Any, name: str) -> Any:
    """An attribute of an SDK object, including fields the SDK does not declare."""
    v = getattr(obj, name, None)
    if v is None and getattr(obj, "model_extra", None):
        v = obj.model_extra.get(name)
    return v


class Client(abc.ABC):
    """What the agent loop needs of an endpoint: one assistant turn for a history and tools."""

    protocol = ""

    def __init__(self, base_url: str, model: str, api_key: str = "none", keep_thinking: bool = True,
                 max_tokens: int = 512, temperature: float | None = None, timeout: float = 120.0) -> None:
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.keep_thinking, self.max_tokens, self.temperature, self.timeout = keep_thinking, max_tokens, temperature, timeout

    @abc.abstractmethod
    def complete(self, history: History, tools: list[dict], system: str | None = None) -> Turn:
        """The model's next turn, with the history sent in this protocol's own form."""


class ChatCompletionsClient(Client):
    protocol = "openai"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        import openai
        self.sdk = openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, timeout=self.timeout)

    def messages(self, history: History, system: str | None) -> list[dict]:
        out: list[dict] = [{"role": "system", "content": system}] if system else []
        for h in history:
            if isinstance(h, str):
                out.append({"role": "user", "content": h})
            elif isinstance(h, ToolOutput):
                out.append({"role": "tool", "tool_call_id": h.call_id, "content": h.content})
            else:
                m: dict[str, Any] = {"role": "assistant", "content": h.content}
                if self.keep_thinking and h.reasoning:
                    m["reasoning_details"] = [{"type": "reasoning.text", "text": h.reasoning}]
                if h.tool_calls:
                    m["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                        "name": c.name, "arguments": c.arguments if isinstance(c.arguments, str)
                        else json.dumps(c.arguments, ensure_ascii=False)}} for c in h.tool_calls]
                out.append(m)
        return out

    def complete(self, history: History, tools: list[dict], system: str | None = None) -> Turn:
        kw: dict[str, Any] = {"temperature": self.temperature} if self.temperature is not None else {}
        resp = self.sdk.chat.completions.create(
            model=self.model, messages=self.messages(history, system), tools=tools or None,
            max_tokens=self.max_tokens, extra_body={"reasoning_split": True}, **kw)
        choice = resp.choices[0]
        msg = choice.message
        details = _get(msg, "reasoning_details") or []
        reasoning = "".join((d.get("text", "") if isinstance(d, dict) else getattr(d, "text", "")) for d in details)
        reasoning = reasoning or _get(msg, "reasoning_content") or ""
        content = msg.content or ""
        if not reasoning:
            reasoning, content = _split_inline(content)
        calls = [ToolCall(c.id, c.function.name, _args(c.function.arguments)) for c in msg.tool_calls or []]
        usage = resp.usage.model_dump() if resp.usage else {}
        return Turn(reasoning, content, calls, usage=usage, finish=choice.finish_reason or "")


class ResponsesClient(Client):
    protocol = "responses"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        import openai
        self.sdk = openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, timeout=self.timeout)

    def items(self, history: History) -> list[dict]:
        out: list[dict] = []
        for h in history:
            if isinstance(h, str):
                out.append({"type": "message", "role": "user", "content": [{"type": "input_text", "text": h}]})
            elif isinstance(h, ToolOutput):
                out.append({"type": "function_call_output", "call_id": h.call_id, "output": h.content})
            else:
                out += [it for it in h.native if self.keep_thinking or it.get("type") != "reasoning"]
        return out

    def complete(self, history: History, tools: list[dict], system: str | None = None) -> Turn:
        fns = [{"type": "function", "name": t["function"]["name"], "description": t["function"].get("description", ""),
                "parameters": t["function"].get("parameters", {"type": "object", "properties": {}})} for t in tools]
        kw: dict[str, Any] = {"temperature": self.temperature} if self.temperature is not None else {}
        resp = self.sdk.responses.create(model=self.model, input=self.items(history), tools=fns,
                                         instructions=system, store=False, max_output_tokens=self.max_tokens, **kw)
        turn = Turn(finish=resp.status or "")
        for item in resp.output:
            kind = item.type
            if kind == "reasoning":
                parts = [c.text for c in (item.content or [])] or [s.text for s in (item.summary or [])]
                turn.reasoning += "".join(parts)
                turn.native.append({"type": "reasoning", "id": item.id,
                                    "summary": [{"type": "summary_text", "text": s.text} for s in item.summary or []],
                                    "content": [{"type": "reasoning_text", "text": c.text} for c in item.content or []]})
            elif kind == "message":
                text = "".join(c.text for c in item.content if getattr(c, "type", "") == "output_text")
                turn.content += text
                turn.native.append({"type": "message", "role": "assistant", "id": item.id,
                                    "content": [{"type": "output_text", "text": text}]})
            elif kind == "function_call":
                turn.tool_calls.append(ToolCall(item.call_id, item.name, _args(item.arguments)))
                turn.native.append({"type": "function_call", "id": item.id, "call_id": item.call_id,
                                    "name": item.name, "arguments": item.arguments})
        turn.usage = resp.usage.model_dump() if resp.usage else {}
        return turn


class AnthropicClient(Client):
    protocol = "anthropic"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        import anthropic
        self.sdk = anthropic.Anthropic(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout)

    def messages(self, history: History) -> list[dict]:
        out: list[dict] = []
        for h in history:
            if isinstance(h, str):
                out.append({"role": "user", "content": [{"type": "text", "text": h}]})
            elif isinstance(h, ToolOutput):
                block = {"type": "tool_result", "tool_use_id": h.call_id, "content": h.content, "is_error": not h.ok}
                if out and out[-1]["role"] == "user" and out[-1]["content"][-1]["type"] == "tool_result":
                    out[-1]["content"].append(block)  # results of one turn's calls go in one user message
                else:
                    out.append({"role": "user", "content": [block]})
            else:
                blocks = [b for b in h.native if self.keep_thinking or b["type"] != "thinking"]
                out.append({"role": "assistant", "content": blocks or [{"type": "text", "text": h.content or " "}]})
        return out

    def complete(self, history: History, tools: list[dict], system: str | None = None) -> Turn:
        defs = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                 "input_schema": t["function"].get("parameters", {"type": "object", "properties": {}})} for t in tools]
        kw: dict[str, Any] = {"system": system} if system else {}
        if self.temperature is not None:  # not every SDK version takes it as an argument
            kw["extra_body"] = {"temperature": self.temperature}
        resp = self.sdk.messages.create(model=self.model, max_tokens=self.max_tokens, messages=self.messages(history),
                                        tools=defs, thinking={"type": "enabled", "budget_tokens": 1024}, **kw)
        turn = Turn(finish=resp.stop_reason or "")
        for b in resp.content:
            if b.type == "thinking":
                turn.reasoning += b.thinking
                turn.native.append({"type": "thinking", "thinking": b.thinking, "signature": b.signature})
            elif b.type == "text":
                turn.content += b.text
                turn.native.append({"type": "text", "text": b.text})
            elif b.type == "tool_use":
                turn.tool_calls.append(ToolCall(b.id, b.name, b.input if isinstance(b.input, dict) else str(b.input)))
                turn.native.append({"type": "tool_use", "id": b.id, "name": b.name, "input": b.input})
        turn.usage = {"input_tokens": resp.usage.input_tokens, "output_tokens": resp.usage.output_tokens}
        return turn


def make_client(protocol: str, base_url: str, model: str, **kw: Any) -> Client:
    classes = {"openai": ChatCompletionsClient, "responses": ResponsesClient, "anthropic": AnthropicClient}
    if protocol not in classes:
        raise ValueError(f"protocol {protocol!r}: expected one of {PROTOCOLS}")
    return classes[protocol](base_url, model, **kw)
