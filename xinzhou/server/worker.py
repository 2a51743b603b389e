"""One engine, one thread: the server's requests are queued into it and their events come back on
per-request asyncio queues.

The thread owns the model. It admits new requests and cancellations between engine steps, so a
client that disconnects frees its slot before the next step. Each request's events are turned
into chat-format events here (the only place the server reads model output): token ids go
through `chat_format.StreamParser.feed_ids`, so only special token ids are structure.

A tool call reaches the protocols only once the parser has closed it: its start and argument
pieces are held until its `</invoke>`, then sent together with its end. A call the parser gives up
on (malformed, or cut off by max_tokens) is never sent as a call; its text comes as content. So a
stream carries exactly the calls and the content of the non-streamed answer, and a client never
acts on a call that the final message does not hold. Calls are numbered as sent (0, 1, ...).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from xinzhou.chat_format import (CallGuide, ContentDelta, Event, ReasoningDelta, StreamParser, ToolCallArgs, ToolCallEnd,
                                 ToolCallError, ToolCallStart)
from xinzhou.engine import Engine, Finished, SamplingParams, Token
from xinzhou.engine.threaded import EngineThread
from xinzhou.tokenizer import Tokenizer


@dataclass(frozen=True)
class Done:
    """The end of a generation: why, and the token counts."""
    finish: str  # "stop" (end of turn), "stop_string", "length", "cancelled", "error"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    logprobs: list[tuple[int, float]] = field(default_factory=list)
    error: str = ""


@dataclass
class _Job:
    prompt: list[int]
    params: SamplingParams
    tools: Sequence[dict] | None
    stop_strings: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    guide: CallGuide | None = None
    thinking: bool = True  # the prompt leaves the thinking open (False: prefilled empty and closed)
    rid: int | None = None
    parser: StreamParser | None = None
    ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float]] = field(default_factory=list)
    in_reasoning: bool = True
    reasoning_tokens: int = 0
    stopped: bool = False  # a stop string was seen: the rest is not emitted
    held: str = ""  # content that could be the start of a stop string
    call: list[Event] = field(default_factory=list)  # the open tool call's start and arguments, not yet sent
    calls_sent: int = 0


class EngineWorker(EngineThread):
    """Runs `Engine.step` in a background thread (xinzhou.engine.threaded.EngineThread); `submit`
    from any asyncio task."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, **engine_kw: Any) -> None:
        super().__init__(Engine(model, tokenizer, **engine_kw))
        self.tokenizer = tokenizer
        self._jobs: dict[int, _Job] = {}
        self.start()

    @property
    def max_context(self) -> int:
        return self.engine.model.config.max_position_embeddings

    def submit(self, prompt: list[int], params: SamplingParams, tools: Sequence[dict] | None,
               stop_strings: tuple[str, ...] = (), guide: CallGuide | None = None, thinking: bool = True) -> _Job:
        """Queue a generation; its events (chat-format events, then one Done) arrive on job.out.
        guide: force a tool call (tool_choice required or named). thinking=False: the prompt was
        rendered with the thinking closed, so the output is content from the start."""
        job = _Job(prompt, params, tools, stop_strings, asyncio.get_running_loop(), asyncio.Queue(), guide,
                   thinking, in_reasoning=thinking)
        self.post(("add", job))
        return job

    def cancel(self, job: _Job) -> None:
        self.post(("cancel", job))

    def close(self, timeout: float = 10.0) -> None:
        super().close(timeout)

    # the engine thread ------------------------------------------------------------------------
    def _send(self, job: _Job, item: object) -> None:
        job.loop.call_soon_threadsafe(job.out.put_nowait, item)

    def handle(self, item: tuple[str, _Job]) -> None:  # type: ignore[override]
        kind, job = item
        if kind == "add":
            try:
                job.rid = self.engine.add_request(job.prompt, job.params, guide=job.guide)
            except ValueError as e:
                self._send(job, Done("error", len(job.prompt), 0, 0, 0, error=str(e)))
                return
            job.parser = StreamParser(job.tools, thinking_open=job.thinking, tokenizer=self.tokenizer)
            self._jobs[job.rid] = job
        elif job.rid is not None and job.rid in self._jobs:
            self.engine.cancel(job.rid)

    def on_event(self, ev: object) -> None:
        job = self._jobs.get(ev.request_id)  # type: ignore[attr-defined]
        if job is None:
            return
        if isinstance(ev, Token):
            self._token(job, ev)
        elif isinstance(ev, Finished):
            self._finish(job, ev)

    def step_failed(self, error: Exception) -> None:
        for job in list(self._jobs.values()):
            self._send(job, Done("error", len(job.prompt), 0, len(job.ids), job.reasoning_tokens,
                                 error=f"{type(error).__name__}: {error}"))
            self.engine.cancel(job.rid)
        self._jobs.clear()

    def _token(self, job: _Job, ev: Token) -> None:
        job.ids.append(ev.token_id)
        if ev.logprob is not None:
            job.logprobs.append((ev.token_id, ev.logprob))
        if job.in_reasoning:
            job.reasoning_tokens += 1
        if ev.token_id == self.tokenizer.eos_id:
            return  # the end of the turn: Finished follows
        self._emit(job, job.parser.feed_ids([ev.token_id]))
        if job.stopped and job.rid in self._jobs:
            self.engine.cancel(job.rid)

    def _emit(self, job: _Job, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, ReasoningDelta):
                if not job.stopped:
                    self._send(job, e)
                continue
            job.in_reasoning = False
            if isinstance(e, ContentDelta):
                text = self._filter(job, e.text)
                if text:
                    self._send(job, ContentDelta(text))
            elif job.stopped:
                continue
            elif isinstance(e, (ToolCallStart, ToolCallArgs)):
                job.call.append(e)
            elif isinstance(e, ToolCallEnd):
                if job.held:
                    self._send(job, ContentDelta(job.held))
                    job.held = ""
                for held in job.call + [e]:
                    self._send(job, replace(held, index=job.calls_sent))
                job.call, job.calls_sent = [], job.calls_sent + 1
            elif isinstance(e, ToolCallError):  # the open call (if any) was never sent: drop it
                job.call = []
                self._send(job, replace(e, index=None))

    def _filter(self, job: _Job, text: str) -> str:
        """Content with the stop strings cut: nothing from the first one on is emitted; a tail that
        could begin one is held back until it is decided. Not the engine's stop_strings: those match
        all decoded text, thinking included, while a client's `stop` is about the answer, and only
        the parser (here) knows where the thinking ends."""
        if job.stopped or not job.stop_strings:
            return "" if job.stopped else text
        buf = job.held + text
        hits = [i for i in (buf.find(s) for s in job.stop_strings) if i >= 0]
        if hits:
            job.stopped, job.held = True, ""
            return buf[:min(hits)]
        keep = max((k for s in job.stop_strings for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        job.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def _finish(self, job: _Job, ev: Finished) -> None:
        if not job.stopped:
            self._emit(job, job.parser.finish())
            if job.held:
                self._send(job, ContentDelta(job.held))
        reason = "stop_string" if job.stopped else ev.reason
        self._send(job, Done(reason, ev.usage.prompt_tokens, ev.usage.cached_prompt_tokens,
                             ev.usage.completion_tokens, job.reasoning_tokens, job.logprobs))
        self._jobs.pop(job.rid, None)
