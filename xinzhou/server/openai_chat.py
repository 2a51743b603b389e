"""OpenAI Chat Completions: `POST /v1/chat/completions` -> messages + tools + sampling; the
generation's events -> a `chat.completion` or a stream of `chat.completion.chunk`s.

Thinking is inline in `content` as `<think>...</think>` by default (as MiniMax's API returns it);
with `reasoning_split: true` it is `reasoning_content` and `reasoning_details`. Thinking sent back
in any of those forms goes into the prompt by the M2 rules (chat_format.render). A tool call
streams once it has parsed whole (server.worker holds it until its `</invoke>`): the header (id,
name), then the arguments as JSON deltas (string values as written, others whole) that
concatenate to the final arguments. A call that turns out malformed, or is cut off by max_tokens,
never streams as a call: its text is content, as in the non-streamed reply. tool_choice "required" or
a named function forces the call's opening (chat_format.CallGuide; "required" over one tool forces its
name too); the model writes the arguments.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from xinzhou.server.common import (APIError, ContentDelta, Done, ReasoningDelta, ToolCallArgs, ToolCallEnd,
                                    ToolCallStart, bad, call_guide, check_tools, collect, events, field_of, new_id, prompt_ids, sampling, stop_list)
from xinzhou.server.worker import EngineWorker


def _messages(raw: Any) -> list[dict]:
    """The request's messages, with thinking sent back as reasoning_details mapped to reasoning_content."""
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        m = dict(m)
        if m["role"] == "developer":
            m["role"] = "system"
        details = m.pop("reasoning_details", None)
        if m["role"] == "assistant" and not m.get("reasoning_content") and isinstance(details, list):
            m["reasoning_content"] = "".join(d.get("text", "") for d in details if isinstance(d, dict))
        if m["role"] == "assistant" and isinstance(m.get("tool_calls"), list):
            for c in m["tool_calls"]:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str) and not fn["arguments"].strip():
                    fn["arguments"] = "{}"
        out.append(m)
    return out


def parse_request(worker: EngineWorker, body: dict) -> dict:
    n = field_of(body, "n", int, 1)
    if n != 1:
        raise bad(f"n = {n}: only n = 1 is supported", "n")
    tools = check_tools(body.get("tools"))
    choice = body.get("tool_choice", "auto")
    forced: str | bool = False
    if choice == "none":
        tools = None
    elif choice == "required":
        forced = True
    elif isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad("tool_choice: a named function is {'type': 'function', 'function': {'name': ...}}", "tool_choice")
        forced = fn["name"]
    elif choice != "auto":
        raise bad(f"tool_choice {choice!r}: expected 'auto', 'none', 'required' or a named function", "tool_choice")
    guide = call_guide(worker, tools, forced, "tool_choice")
    messages = _messages(body.get("messages"))
    prompt = prompt_ids(worker, messages, tools)
    max_tokens = field_of(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = field_of(body, "max_tokens", int, None)
    extra_top_k = field_of(body, "top_k", int, None)
    logprobs = bool(field_of(body, "logprobs", bool, False))
    params = sampling(worker, prompt, max_tokens, field_of(body, "temperature", (int, float), None),
                      field_of(body, "top_p", (int, float), None), extra_top_k, field_of(body, "seed", int, None),
                      logprobs)
    stream_options = body.get("stream_options") or {}
    return dict(prompt=prompt, params=params, tools=tools, guide=guide, stops=stop_list(body.get("stop")),
                split=bool(body.get("reasoning_split", False)), stream=bool(field_of(body, "stream", bool, False)),
                usage_in_stream=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
                logprobs=logprobs)


def _finish_reason(done: Done, calls: int) -> str:
    if calls:
        return "tool_calls"
    return "length" if done.finish == "length" else "stop"


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": done.reasoning_tokens}}


def _call(ev: ToolCallEnd) -> dict:
    return {"id": ev.id, "type": "function",
            "function": {"name": ev.name, "arguments": json.dumps(ev.arguments, ensure_ascii=False)}}


def _logprobs(worker: EngineWorker, done: Done) -> dict:
    tok = worker.tokenizer
    return {"content": [{"token": tok.decode([i]), "logprob": lp, "bytes": list(tok.token_bytes(i)), "top_logprobs": []}
                        for i, lp in done.logprobs]}


async def complete(worker: EngineWorker, req: dict, model: str) -> dict:
    g = await collect(events(worker, req["prompt"], req["params"], req["tools"], req["stops"], req["guide"]))
    msg: dict[str, Any] = {"role": "assistant"}
    if req["split"]:
        msg["content"] = g.content
        msg["reasoning_content"] = g.reasoning
        msg["reasoning_details"] = [{"type": "reasoning.text", "id": "reasoning-0", "format": "MiniMax-response-v1",
                                     "index": 0, "text": g.reasoning}]
    else:
        msg["content"] = f"<think>\n{g.reasoning}\n</think>\n\n{g.content}" if g.reasoning else g.content
    if g.calls:
        msg["tool_calls"] = [_call(c) for c in g.calls]
    choice = {"index": 0, "message": msg, "finish_reason": _finish_reason(g.done, len(g.calls)),
              "logprobs": _logprobs(worker, g.done) if req["logprobs"] else None}
    return {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": _usage(g.done)}


async def stream(worker: EngineWorker, req: dict, model: str) -> AsyncIterator[str]:
    cid, created = new_id("chatcmpl-"), int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    calls = 0
    thinking_open = False  # inline mode: "<think>\n" sent, "</think>" not yet
    try:
        async for ev in events(worker, req["prompt"], req["params"], req["tools"], req["stops"], req["guide"]):
            if isinstance(ev, ReasoningDelta):
                if req["split"]:
                    yield chunk({"reasoning_content": ev.text,
                                 "reasoning_details": [{"type": "reasoning.text", "id": "reasoning-0",
                                                        "format": "MiniMax-response-v1", "index": 0, "text": ev.text}]})
                else:
                    yield chunk({"content": ("" if thinking_open else "<think>\n") + ev.text})
                    thinking_open = True
                continue
            if thinking_open and not isinstance(ev, Done):
                yield chunk({"content": "\n</think>\n\n"})
                thinking_open = False
            if isinstance(ev, ContentDelta):
                yield chunk({"content": ev.text})
            elif isinstance(ev, ToolCallStart):
                yield chunk({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                             "function": {"name": ev.name, "arguments": ""}}]})
            elif isinstance(ev, ToolCallArgs):
                yield chunk({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.delta}}]})
            elif isinstance(ev, ToolCallEnd):
                calls += 1
            elif isinstance(ev, Done):
                if thinking_open:
                    yield chunk({"content": "\n</think>\n\n"})
                yield chunk({}, _finish_reason(ev, calls))
                if req["usage_in_stream"]:
                    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(ev)}
                    yield f"data: {json.dumps(body)}\n\n"
    except APIError as e:  # after the headers: the error goes in the stream
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'param': e.param, 'code': None}})}\n\n"
    yield "data: [DONE]\n\n"
