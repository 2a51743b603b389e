"""OpenAI Responses, stateless: `POST /v1/responses` with the whole history in `input` (the Codex
CLI's way: `store: false`, no previous_response_id).

Input items: message (user / assistant / system / developer; input_text / output_text parts),
reasoning (its content or summary text goes back into the prompt as the turn's thinking),
function_call, function_call_output, custom_tool_call, custom_tool_call_output. Tools: function
tools, and free-form custom tools (Codex's apply_patch): the model sees a custom tool as a
function with one string parameter, `input`, whose description carries the tool's grammar when
it has one (the grammar is shown to the model, not enforced). tool_choice "required" or a named
tool forces the call's opening (chat_format.CallGuide). Output: reasoning, message,
function_call and custom_tool_call items. The
stream carries a `type` and a `sequence_number` in every event: response.created,
response.in_progress, per item output_item.added / .done (with content_part, output_text and
reasoning_text deltas, function_call_arguments delta / done, custom_tool_call_input delta /
done), then response.completed (response.incomplete when cut by max_output_tokens) with the whole
response object; item ids and call ids are the same in the stream and in that object. A call's
item is added once the call has parsed whole (server.worker holds it until its `</invoke>`); a
call that turns out malformed, or is cut off, is no item: its text is a message, as in the
non-streamed reply.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from xinzhou.server.common import (APIError, ContentDelta, Done, ReasoningDelta, ToolCallArgs, ToolCallEnd,
                                    ToolCallStart, bad, call_guide, check_tools, collect, events,
                                    field_of, function_tool, new_id, prompt_ids, sampling)
from xinzhou.server.worker import EngineWorker


def _part_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where}.content: expected a string or a list of parts", where)
    out = []
    for p in content:
        if isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text", "summary_text",
                                                     "reasoning_text"):
            out.append(p.get("text", ""))
        else:
            raise bad(f"{where}.content: unsupported part {p!r:.80}", where)
    return "".join(out)


def to_messages(body: dict) -> list[dict]:
    msgs: list[dict] = []
    if body.get("instructions"):
        msgs.append({"role": "system", "content": field_of(body, "instructions", str)})
    raw = body.get("input")
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad("'input' must be a string or a non-empty list of items", "input")
    pending: dict[str, Any] | None = None  # the assistant turn being rebuilt from items

    def turn() -> dict:
        nonlocal pending
        if pending is None:
            pending = {"role": "assistant", "content": "", "reasoning_content": ""}
            msgs.append(pending)
        return pending

    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where}: expected an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role == "assistant":
                turn()["content"] += _part_text(item.get("content"), where)
                continue
            if role not in ("user", "system", "developer"):
                raise bad(f"{where}.role: expected user, assistant, system or developer", where)
            pending = None
            if role in ("system", "developer") and msgs and msgs[0]["role"] == "system":
                msgs[0]["content"] += "\n\n" + _part_text(item.get("content"), where)
            elif role in ("system", "developer"):
                msgs.insert(0, {"role": "system", "content": _part_text(item.get("content"), where)})
            else:
                msgs.append({"role": "user", "content": _part_text(item.get("content"), where)})
        elif kind == "reasoning":
            text = _part_text(item.get("content") or [], where) or _part_text(item.get("summary") or [], where)
            turn()["reasoning_content"] += text
        elif kind == "function_call":
            args = item.get("arguments") or "{}"
            try:
                parsed = json.loads(args)
            except (TypeError, json.JSONDecodeError):
                raise bad(f"{where}.arguments: not a JSON object string", where) from None
            turn().setdefault("tool_calls", []).append(
                {"id": item.get("call_id", ""), "type": "function", "function": {"name": item.get("name"), "arguments": parsed}})
        elif kind == "custom_tool_call":
            turn().setdefault("tool_calls", []).append(
                {"id": item.get("call_id", ""), "type": "function",
                 "function": {"name": item.get("name"), "arguments": {"input": str(item.get("input", ""))}}})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            pending = None
            out = item.get("output", "")
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": out if isinstance(out, str) else _part_text(out, where)})
        else:
            raise bad(f"{where}.type: unsupported item type {kind!r}", where)
    return msgs


def _custom_tool(t: dict, i: int) -> dict:
    """A free-form tool as the model sees it: a function of one string, `input`."""
    fmt = t.get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "grammar"):
        raise bad(f"tools[{i}].format: expected {{'type': 'text'}} or {{'type': 'grammar', ...}}", f"tools[{i}].format")
    about = "The tool's whole input, as free-form text."
    if fmt["type"] == "grammar":
        if not isinstance(fmt.get("definition"), str) or fmt.get("syntax") not in ("lark", "regex"):
            raise bad(f"tools[{i}].format: a grammar needs 'syntax' ('lark' or 'regex') and a 'definition' string",
                      f"tools[{i}].format")
        about = f"The tool's whole input; it must match this {fmt['syntax']} grammar:\n{fmt['definition']}"
    return function_tool(t.get("name"), t.get("description"), {
        "type": "object", "properties": {"input": {"type": "string", "description": about}}, "required": ["input"]})


def _tools(raw: Any) -> tuple[list[dict] | None, set[str]]:
    """The tools in the chat format's shape, and the names of the custom (free-form) ones."""
    if raw is None:
        return None, set()
    if not isinstance(raw, list):
        raise bad("'tools' must be a list", "tools")
    out, custom = [], set()
    for i, t in enumerate(raw):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind == "function":
            out.append(function_tool(t.get("name"), t.get("description"), t.get("parameters")))
        elif kind == "custom":
            out.append(_custom_tool(t, i))
            custom.add(t.get("name"))
        else:
            raise bad(f"tools[{i}]: only function and custom tools are supported, got type {kind or t!r}",
                      f"tools[{i}]")
    return check_tools(out), custom


def parse_request(worker: EngineWorker, body: dict) -> dict:
    tools, custom = _tools(body.get("tools"))
    choice = body.get("tool_choice", "auto")
    forced: str | bool = False
    if choice == "none":
        tools = None
    elif choice == "required":
        forced = True
    elif isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
        if not isinstance(choice.get("name"), str):
            raise bad("tool_choice: a named tool is {'type': 'function', 'name': ...}", "tool_choice")
        forced = choice["name"]
    elif choice != "auto":
        raise bad(f"tool_choice {choice!r}: expected 'auto', 'none', 'required' or a named tool", "tool_choice")
    guide = call_guide(worker, tools, forced, "tool_choice")
    prompt = prompt_ids(worker, to_messages(body), tools)
    params = sampling(worker, prompt, field_of(body, "max_output_tokens", int, None),
                      field_of(body, "temperature", (int, float), None), field_of(body, "top_p", (int, float), None),
                      None, None)
    return dict(prompt=prompt, params=params, tools=tools, custom=custom, guide=guide, choice=choice, stream=bool(field_of(body, "stream", bool, False)),
                instructions=body.get("instructions"))


def _usage(done: Done) -> dict:
    return {"input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": done.cached_tokens},
            "output_tokens": done.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": done.reasoning_tokens},
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _response(rid: str, model: str, created: int, output: list[dict], status: str, done: Done | None,
              req: dict) -> dict:
    return {"id": rid, "object": "response", "created_at": created, "model": model, "status": status,
            "output": output, "usage": _usage(done) if done else None, "error": None, "incomplete_details":
            ({"reason": "max_output_tokens"} if done and done.finish == "length" and status == "incomplete" else None),
            "instructions": req.get("instructions"), "parallel_tool_calls": True, "tool_choice": req.get("choice", "auto"),
            "tools": [], "store": False, "temperature": req["params"].temperature, "top_p": req["params"].top_p,
            "metadata": {}}


def _reasoning_item(iid: str, text: str) -> dict:
    return {"type": "reasoning", "id": iid, "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": "completed"}


def _message_item(iid: str, text: str) -> dict:
    return {"type": "message", "id": iid, "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call_id: str, name: str, custom: set[str], arguments: dict | None = None) -> dict:
    """A function_call (or custom_tool_call) item; arguments None: the item as it opens."""
    tag = call_id.removeprefix("call_")
    if name in custom:  # its one string; a model that wrote other parameters gets them as JSON
        args = arguments or {}
        value = args.get("input", "") if "input" in args or not args else args
        return {"type": "custom_tool_call", "id": "ctc_" + tag, "call_id": call_id, "name": name,
                "input": value if isinstance(value, str) else json.dumps(value, ensure_ascii=False),
                "status": "completed"}
    return {"type": "function_call", "id": "fc_" + tag, "call_id": call_id, "name": name,
            "arguments": "" if arguments is None else json.dumps(arguments, ensure_ascii=False), "status": "completed"}


async def complete(worker: EngineWorker, req: dict, model: str) -> dict:
    g = await collect(events(worker, req["prompt"], req["params"], req["tools"], (), req["guide"]))
    output = []
    if g.reasoning:
        output.append(_reasoning_item(new_id("rs_"), g.reasoning))
    if g.content or not (g.reasoning or g.calls):
        output.append(_message_item(new_id("msg_"), g.content))
    output += [_call_item(c.id, c.name, req["custom"], c.arguments) for c in g.calls]
    status = "incomplete" if g.done.finish == "length" else "completed"
    return _response(new_id("resp_"), model, int(time.time()), output, status, g.done, req)


async def stream(worker: EngineWorker, req: dict, model: str) -> AsyncIterator[str]:
    rid, created, seq = new_id("resp_"), int(time.time()), 0
    output: list[dict] = []
    current: dict | None = None  # the reasoning or message item being streamed
    call: dict | None = None  # the call item being streamed

    def sse(kind: str, data: dict) -> str:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq - 1, **data}, ensure_ascii=False)}\n\n"

    def close() -> list[str]:
        nonlocal current
        if current is None:
            return []
        idx = len(output) - 1
        out = []
        if current["type"] == "reasoning":
            text = current["content"][0]["text"]
            out.append(sse("response.reasoning_text.done", {"item_id": current["id"], "output_index": idx,
                                                            "content_index": 0, "text": text}))
        else:
            part = current["content"][0]
            out.append(sse("response.output_text.done", {"item_id": current["id"], "output_index": idx,
                                                         "content_index": 0, "text": part["text"], "logprobs": []}))
            out.append(sse("response.content_part.done", {"item_id": current["id"], "output_index": idx,
                                                          "content_index": 0, "part": part}))
        current["status"] = "completed"
        out.append(sse("response.output_item.done", {"output_index": idx, "item": current}))
        current = None
        return out

    def open_item(item: dict) -> list[str]:
        nonlocal current
        output.append(item)
        current = item
        idx = len(output) - 1
        out = [sse("response.output_item.added", {"output_index": idx, "item": {**item, "status": "in_progress"}})]
        if item["type"] == "message":
            out.append(sse("response.content_part.added", {"item_id": item["id"], "output_index": idx,
                                                           "content_index": 0, "part": item["content"][0]}))
        return out

    yield sse("response.created", {"response": _response(rid, model, created, [], "in_progress", None, req)})
    yield sse("response.in_progress", {"response": _response(rid, model, created, [], "in_progress", None, req)})
    try:
        async for ev in events(worker, req["prompt"], req["params"], req["tools"], (), req["guide"]):
            if isinstance(ev, ReasoningDelta):
                if current is None or current["type"] != "reasoning":
                    for s in close() + open_item(_reasoning_item(new_id("rs_"), "")):
                        yield s
                current["content"][0]["text"] += ev.text
                yield sse("response.reasoning_text.delta", {"item_id": current["id"], "output_index": len(output) - 1,
                                                            "content_index": 0, "delta": ev.text})
            elif isinstance(ev, ContentDelta):
                if current is None or current["type"] != "message":
                    for s in close() + open_item(_message_item(new_id("msg_"), "")):
                        yield s
                current["content"][0]["text"] += ev.text
                yield sse("response.output_text.delta", {"item_id": current["id"], "output_index": len(output) - 1,
                                                         "content_index": 0, "delta": ev.text, "logprobs": []})
            elif isinstance(ev, ToolCallStart):
                for s in close():
                    yield s
                call = _call_item(ev.id, ev.name, req["custom"])
                output.append(call)
                yield sse("response.output_item.added", {"output_index": len(output) - 1,
                                                         "item": {**call, "status": "in_progress"}})
            elif isinstance(ev, ToolCallArgs) and call is not None and call["type"] == "function_call":
                call["arguments"] += ev.delta
                yield sse("response.function_call_arguments.delta", {"item_id": call["id"], "output_index": len(output) - 1,
                                                                     "delta": ev.delta})
            elif isinstance(ev, ToolCallArgs) and call is not None and ev.param == "input" and ev.text:
                call["input"] += ev.text  # a custom tool's input, as the model writes it
                yield sse("response.custom_tool_call_input.delta", {"item_id": call["id"], "output_index": len(output) - 1,
                                                                    "delta": ev.text})
            elif isinstance(ev, ToolCallEnd) and call is not None:
                idx = len(output) - 1
                streamed = call.get("input", "")
                output[idx] = call = {**_call_item(ev.id, ev.name, req["custom"], ev.arguments), "id": call["id"]}
                if call["type"] == "custom_tool_call":
                    # what the stream has not carried yet (all of it when the model wrote other parameters)
                    rest = call["input"][len(streamed):] if call["input"].startswith(streamed) else call["input"]
                    if rest:
                        yield sse("response.custom_tool_call_input.delta", {"item_id": call["id"], "output_index": idx,
                                                                            "delta": rest})
                    yield sse("response.custom_tool_call_input.done", {"item_id": call["id"], "output_index": idx,
                                                                       "input": call["input"]})
                else:
                    yield sse("response.function_call_arguments.done", {"item_id": call["id"], "output_index": idx,
                                                                        "arguments": call["arguments"]})
                yield sse("response.output_item.done", {"output_index": idx, "item": call})
                call = None
            elif isinstance(ev, Done):
                for s in close():
                    yield s
                status = "incomplete" if ev.finish == "length" else "completed"
                yield sse("response.completed" if status == "completed" else "response.incomplete",
                          {"response": _response(rid, model, created, output, status, ev, req)})
    except APIError as e:
        yield sse("response.failed", {"response": {**_response(rid, model, created, output, "failed", None, req),
                                                   "error": {"code": e.kind, "message": e.message}}})
