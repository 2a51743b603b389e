"""Anthropic Messages: `POST /v1/messages` (and `?beta=true`) and `/v1/messages/count_tokens`.

Content blocks in: text, thinking (with or without a signature; redacted thinking is dropped),
tool_use, tool_result. Out: a thinking block signed by this server (HMAC of the thinking text with
a per-server key; a block coming back with a signature that does not verify is refused, one
without a signature is taken as the client's text), text, tool_use. `thinking` may be enabled,
adaptive or disabled (disabled prefills an empty, closed thinking block: the model answers at once). Streaming sends
the exact event sequence: message_start, per block content_block_start / _delta / _stop,
message_delta (stop_reason, usage), message_stop. A tool_use block opens once the call has parsed
whole (server.worker holds it until its `</invoke>`), and its input follows as `input_json_delta`
pieces (string values as written); a call that turns out malformed (or is cut off by max_tokens)
is no tool_use block: its text is a text block, as in the non-streamed reply. tool_choice `any` or `tool` forces the
call's opening (chat_format.CallGuide); the model writes the input.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

from xinzhou.server.common import (APIError, ContentDelta, Done, ReasoningDelta, ToolCallArgs, ToolCallEnd,
                                    ToolCallStart, bad, call_guide, check_tools,
                                    collect, events, field_of, function_tool, new_id, prompt_ids, sampling,
                                    stop_list)
from xinzhou.server.worker import EngineWorker


def sign(key: bytes, thinking: str) -> str:
    return hmac.new(key, thinking.encode(), hashlib.sha256).hexdigest()


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for b in content:
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str):
                parts.append(b["text"])
            else:
                raise bad(f"{where}: only text blocks are supported here, got {b!r:.80}", where)
        return "".join(parts)
    raise bad(f"{where}: expected a string or a list of text blocks", where)


def _tools(raw: Any) -> list[dict] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise bad("'tools' must be a list", "tools")
    out = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"].strip():
            raise bad(f"tools[{i}]: a tool needs a non-empty 'name'", f"tools[{i}]")
        schema = t.get("input_schema", {"type": "object", "properties": {}})
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise bad(f"tools[{i}].input_schema: expected an object schema", f"tools[{i}].input_schema")
        out.append(function_tool(t["name"], t.get("description"), schema))
    return check_tools(out)


def to_messages(body: dict, key: bytes) -> list[dict]:
    """Anthropic messages -> chat-format messages (system first)."""
    msgs: list[dict] = []
    system = body.get("system")
    if system is not None:
        msgs.append({"role": "system", "content": _text_of(system, "system")})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad(f"{where}.role: expected 'user' or 'assistant'", where)
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise bad(f"{where}.content: expected a string or a list of blocks", where)
        if m["role"] == "assistant":
            reasoning, text, calls = "", "", []
            for j, b in enumerate(blocks):
                kind = b.get("type") if isinstance(b, dict) else None
                if kind == "thinking":
                    sig = b.get("signature")
                    if sig and not hmac.compare_digest(str(sig), sign(key, b.get("thinking", ""))):
                        raise bad(f"{where}.content[{j}]: the thinking block's signature does not match its "
                                  "text (it was changed, or signed by another server)", where)
                    reasoning += b.get("thinking", "")
                elif kind == "redacted_thinking":
                    continue  # nothing readable to give the model back
                elif kind == "text":
                    text += b.get("text", "")
                elif kind == "tool_use":
                    if not isinstance(b.get("input", {}), dict):
                        raise bad(f"{where}.content[{j}].input: expected an object", where)
                    calls.append({"id": b.get("id", ""), "type": "function",
                                  "function": {"name": b.get("name", ""), "arguments": b.get("input", {})}})
                else:
                    raise bad(f"{where}.content[{j}]: unsupported block type {kind!r}", where)
            msg: dict[str, Any] = {"role": "assistant", "content": text, "reasoning_content": reasoning}
            if calls:
                msg["tool_calls"] = calls
            msgs.append(msg)
        else:
            text = ""
            for j, b in enumerate(blocks):
                kind = b.get("type") if isinstance(b, dict) else None
                if kind == "tool_result":
                    c = b.get("content", "")
                    msgs.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                                 "content": _text_of(c, f"{where}.content[{j}].content") if c else ""})
                elif kind == "text":
                    text += b.get("text", "")
                else:
                    raise bad(f"{where}.content[{j}]: unsupported block type {kind!r}", where)
            if text:
                msgs.append({"role": "user", "content": text})
    return msgs


def parse_request(worker: EngineWorker, body: dict, key: bytes) -> dict:
    max_tokens = field_of(body, "max_tokens", int, required=True)
    thinking = body.get("thinking") or {"type": "enabled"}
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive", "disabled"):
        raise bad("'thinking.type' must be 'enabled', 'adaptive' or 'disabled'", "thinking")
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice") or {"type": "auto"}
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad("'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'", "tool_choice")
    forced: str | bool = False
    if choice["type"] == "none":
        tools = None
    elif choice["type"] == "any":
        forced = True
    elif choice["type"] == "tool":
        if not isinstance(choice.get("name"), str):
            raise bad("tool_choice of type 'tool' needs the tool's 'name'", "tool_choice")
        forced = choice["name"]
    guide = call_guide(worker, tools, forced, "tool_choice")
    messages = to_messages(body, key)
    think = thinking["type"] != "disabled"
    if not think and guide is not None:
        raise bad("tool_choice 'any' / 'tool' needs thinking: the forced call opens after the thinking", "tool_choice")
    prompt = prompt_ids(worker, messages, tools, think)
    params = sampling(worker, prompt, max_tokens, field_of(body, "temperature", (int, float), None),
                      field_of(body, "top_p", (int, float), None), field_of(body, "top_k", int, None), None)
    return dict(prompt=prompt, params=params, tools=tools, guide=guide, stops=stop_list(body.get("stop_sequences"), "stop_sequences"),
                show_thinking=think, stream=bool(field_of(body, "stream", bool, False)))


def _stop_reason(done: Done, calls: int) -> str:
    if calls:
        return "tool_use"
    return {"length": "max_tokens", "stop_string": "stop_sequence"}.get(done.finish, "end_turn")


def _usage(done: Done) -> dict:
    return {"input_tokens": done.prompt_tokens - done.cached_tokens, "output_tokens": done.completion_tokens,
            "cache_read_input_tokens": done.cached_tokens, "cache_creation_input_tokens": 0}


async def complete(worker: EngineWorker, req: dict, model: str, key: bytes) -> dict:
    g = await collect(events(worker, req["prompt"], req["params"], req["tools"], req["stops"], req["guide"], req["show_thinking"]))
    content: list[dict] = []
    if req["show_thinking"] and g.reasoning:
        content.append({"type": "thinking", "thinking": g.reasoning, "signature": sign(key, g.reasoning)})
    if g.content:
        content.append({"type": "text", "text": g.content})
    for c in g.calls:
        content.append({"type": "tool_use", "id": c.id.replace("call_", "toolu_", 1), "name": c.name, "input": c.arguments})
    stop = _stop_reason(g.done, len(g.calls))
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": None, "usage": _usage(g.done)}


async def stream(worker: EngineWorker, req: dict, model: str, key: bytes) -> AsyncIterator[str]:
    def sse(kind: str, data: dict) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"

    mid = new_id("msg_")
    yield sse("message_start", {"message": {
        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": len(req["prompt"]), "output_tokens": 0}}})
    index, open_kind, thinking = -1, None, ""
    calls = 0

    def close() -> list[str]:
        nonlocal open_kind
        out = []
        if open_kind == "thinking":
            out.append(sse("content_block_delta", {"index": index, "delta": {"type": "signature_delta",
                                                                               "signature": sign(key, thinking)}}))
        if open_kind is not None:
            out.append(sse("content_block_stop", {"index": index}))
        open_kind = None
        return out

    try:
        async for ev in events(worker, req["prompt"], req["params"], req["tools"], req["stops"], req["guide"], req["show_thinking"]):
            if isinstance(ev, ReasoningDelta):
                if not req["show_thinking"]:
                    continue
                if open_kind != "thinking":
                    for s in close():
                        yield s
                    index += 1
                    open_kind, thinking = "thinking", ""
                    yield sse("content_block_start", {"index": index, "content_block": {
                        "type": "thinking", "thinking": "", "signature": ""}})
                thinking += ev.text
                yield sse("content_block_delta", {"index": index, "delta": {"type": "thinking_delta", "thinking": ev.text}})
            elif isinstance(ev, ContentDelta):
                if open_kind != "text":
                    for s in close():
                        yield s
                    index += 1
                    open_kind = "text"
                    yield sse("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                yield sse("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": ev.text}})
            elif isinstance(ev, ToolCallStart):
                for s in close():
                    yield s
                index += 1
                open_kind = "tool_use"
                yield sse("content_block_start", {"index": index, "content_block": {
                    "type": "tool_use", "id": ev.id.replace("call_", "toolu_", 1), "name": ev.name, "input": {}}})
            elif isinstance(ev, ToolCallArgs):
                yield sse("content_block_delta", {"index": index, "delta": {"type": "input_json_delta",
                                                                               "partial_json": ev.delta}})
            elif isinstance(ev, ToolCallEnd) and open_kind == "tool_use":
                calls += 1
                for s in close():
                    yield s
            elif isinstance(ev, Done):
                for s in close():
                    yield s
                yield sse("message_delta", {"delta": {"stop_reason": _stop_reason(ev, calls), "stop_sequence": None},
                                            "usage": {"output_tokens": ev.completion_tokens}})
                yield sse("message_stop", {})
    except APIError as e:
        yield sse("error", {"error": {"type": e.kind, "message": e.message}})


def count_tokens(worker: EngineWorker, body: dict, key: bytes) -> dict:
    tools = _tools(body.get("tools"))
    thinking = body.get("thinking") or {}
    think = not (isinstance(thinking, dict) and thinking.get("type") == "disabled")
    return {"input_tokens": len(prompt_ids(worker, to_messages(body, key), tools, think))}
