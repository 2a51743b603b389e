"""What the three protocol adapters share: request errors, field checks, the prompt, sampling,
and collecting one generation from the worker."""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from xinzhou.chat_format import (CallGuide, ContentDelta, ReasoningDelta, ToolCallArgs, ToolCallEnd, ToolCallError,
                                 ToolCallStart, render)
from xinzhou.engine import SamplingParams
from xinzhou.schema import check_tool, function_of
from xinzhou.server.worker import Done, EngineWorker


class APIError(Exception):
    """A request the server refuses: HTTP status, the protocol's error type, a message naming the field."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def field_of(body: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None,
             required: bool = False) -> Any:
    """body[name] checked against kinds (bool is not a number here); a 400 naming the field otherwise."""
    if name not in body or body[name] is None:
        if required:
            raise bad(f"missing required field '{name}'", name)
        return default
    v = body[name]
    numeric = kinds in (int, float, (int, float))
    if (numeric and isinstance(v, bool)) or not isinstance(v, kinds):
        want = kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        raise bad(f"field '{name}' must be {want}, got {type(v).__name__}", name)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(f"field '{name}' must be finite", name)
    return v


def function_tool(name: Any, description: Any, parameters: Any) -> dict:
    """A tool definition in the chat format's (OpenAI) shape, from any protocol's fields."""
    return {"type": "function", "function": {"name": name, "description": description or "",
                                             "parameters": parameters or {"type": "object", "properties": {}}}}


def check_tools(tools: Any, param: str = "tools") -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad(f"'{param}' must be a list of tool definitions", param)
    try:
        for i, t in enumerate(tools):
            check_tool(t, i)
    except ValueError as e:
        raise bad(f"invalid tool definition: {e}", param) from None
    return tools or None


def call_guide(worker: EngineWorker, tools: list[dict] | None, forced: str | bool, param: str) -> CallGuide | None:
    """The guide for a forced call: forced is False (auto), True (any tool) or a tool's name."""
    if forced is False:
        return None
    names = [function_of(t, i)["name"] for i, t in enumerate(tools or [])]
    if not names:
        raise bad(f"'{param}' asks for a tool call, but the request has no tools", param)
    if forced is not True and forced not in names:
        raise bad(f"'{param}' names the tool {forced!r}, which is not among the request's tools {names}", param)
    if forced is True and len(names) == 1:  # any tool, of one: that tool, so its <invoke name=...> is forced too
        forced = names[0]
    return CallGuide(worker.tokenizer, None if forced is True else forced)


def prompt_ids(worker: EngineWorker, messages: list[dict], tools: list[dict] | None, thinking: bool = True) -> list[int]:
    try:
        return render(messages, worker.tokenizer, tools=tools, add_generation_prompt=True, thinking=thinking).ids
    except ValueError as e:  # render names the message and field
        raise bad(str(e), "messages") from None


def sampling(worker: EngineWorker, prompt: list[int], max_tokens: int | None, temperature: float | None,
             top_p: float | None, top_k: int | None, seed: int | None, logprobs: bool = False) -> SamplingParams:
    """SamplingParams from a request; max_tokens defaults to what is left of the context."""
    context = worker.max_context
    if len(prompt) >= context:
        raise bad(f"the prompt is {len(prompt)} tokens; the model's context is {context}", "messages")
    room = context - len(prompt)
    if max_tokens is None:
        max_tokens = min(room, 4096)
    if max_tokens < 1:
        raise bad(f"max_tokens = {max_tokens}: must be at least 1", "max_tokens")
    if max_tokens > room:
        raise bad(f"max_tokens = {max_tokens} plus the {len(prompt)}-token prompt exceeds the model's context "
                  f"of {context} tokens (at most {room})", "max_tokens")
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                              top_p=1.0 if top_p is None else top_p, top_k=top_k or 0,
                              stop_ids=(worker.tokenizer.eos_id,), seed=seed, logprobs=logprobs)
    except ValueError as e:
        raise bad(str(e)) from None


def stop_list(stop: Any, param: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad(f"'{param}' must be a non-empty string or a list of up to 4 of them", param)
    return tuple(stop)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass
class Generation:
    """A finished generation, folded."""
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCallEnd] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    done: Done | None = None


async def events(worker: EngineWorker, prompt: list[int], params: SamplingParams, tools: list[dict] | None,
                 stops: tuple[str, ...], guide: CallGuide | None = None, thinking: bool = True) -> AsyncIterator[object]:
    """The generation's events (ReasoningDelta, ContentDelta, ToolCallStart/Args/End/Error), then
    Done. If the consumer goes away (a closed stream), the request is cancelled at once."""
    job = worker.submit(prompt, params, tools, stops, guide, thinking)
    finished = False
    try:
        while True:
            item = await job.out.get()
            if isinstance(item, Done):
                finished = True
                if item.finish == "error":
                    raise APIError(500 if "KV pages" not in item.error else 400, item.error,
                                   "server_error" if "KV pages" not in item.error else "invalid_request_error")
                yield item
                return
            yield item
    finally:
        if not finished:
            worker.cancel(job)


async def collect(stream: AsyncIterator[object]) -> Generation:
    g = Generation()
    async for ev in stream:
        if isinstance(ev, ReasoningDelta):
            g.reasoning += ev.text
        elif isinstance(ev, ContentDelta):
            g.content += ev.text
        elif isinstance(ev, ToolCallEnd):
            g.calls.append(ev)
        elif isinstance(ev, ToolCallError):
            g.errors.append(ev.message)
        elif isinstance(ev, Done):
            g.done = ev
    return g
