"""One Engine shared by many threads: `generate` blocks its caller while a background thread steps
the engine, so concurrent callers (an eval's agent loops, say) are batched together.

    shared = ThreadedEngine(Engine(model, tok, max_batch=32))
    ids, reason, usage = shared.generate(prompt_ids, SamplingParams(max_new_tokens=64, stop_ids=(eos,)))
    shared.close()

A request the engine refuses raises its ValueError in the calling thread; a failed step raises
a RuntimeError in every caller whose request was running (and the engine thread goes on).
"""

from __future__ import annotations

import abc
import queue
import threading
from dataclasses import dataclass, field

from xinzhou.engine.sampling import Guide, SamplingParams
from xinzhou.engine.scheduler import Engine, Event, Finished, Token, Usage


@dataclass
class _Pending:
    prompt: list[int]
    params: SamplingParams
    guide: Guide | None
    done: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)
    reason: str = ""
    usage: Usage | None = None
    error: Exception | None = None


class EngineThread(abc.ABC):
    """The loop both ThreadedEngine and the server's worker run in their own thread: take what
    `post` queued (between steps, so a new request or a cancellation acts before the next step),
    step the engine while it has work, hand each event on. Subclasses fill in `handle` (a posted
    item), `on_event`, `step_failed` (a step raised: the thread goes on) and `closing`, then
    call `start()`."""

    def __init__(self, engine: Engine, name: str = "xinzhou-engine") -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def post(self, item: object) -> None:
        self._inbox.put(item)
        self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout)

    @abc.abstractmethod
    def handle(self, item: object) -> None:
        """A posted item, in the engine thread."""

    @abc.abstractmethod
    def on_event(self, event: Event) -> None:
        """One event of a step."""

    @abc.abstractmethod
    def step_failed(self, error: Exception) -> None:
        """A step raised: fail the requests it held (the thread goes on)."""

    def closing(self) -> None:
        """The loop has stopped (close()): release whoever waits."""

    def _run(self) -> None:
        while not self._stop:
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                self.handle(item)
            if not self.engine.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - one failed step must not kill the thread
                self.step_failed(e)
                continue
            for ev in events:
                self.on_event(ev)
        self.closing()


class ThreadedEngine(EngineThread):
    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self._running: dict[int, _Pending] = {}
        self.start()

    def generate(self, prompt: list[int], params: SamplingParams,
                 guide: Guide | None = None) -> tuple[list[int], str, Usage]:
        """(generated ids, finish reason, usage) of one request; blocks until it finishes."""
        if self._stop:
            raise RuntimeError("ThreadedEngine.generate after close()")
        p = _Pending(list(prompt), params, guide)
        self.post(p)
        p.done.wait()
        if p.error is not None:
            raise p.error
        return p.ids, p.reason, p.usage  # type: ignore[return-value]

    def __enter__(self) -> ThreadedEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self, p: _Pending) -> None:  # type: ignore[override]
        try:
            self._running[self.engine.add_request(p.prompt, p.params, guide=p.guide)] = p
        except ValueError as e:
            p.error = e
            p.done.set()

    def on_event(self, ev: Event) -> None:
        p = self._running.get(ev.request_id)
        if p is None:
            return
        if isinstance(ev, Token):
            p.ids.append(ev.token_id)
        elif isinstance(ev, Finished):
            p.reason, p.usage = ev.reason, ev.usage
            del self._running[ev.request_id]
            p.done.set()

    def step_failed(self, error: Exception) -> None:
        for rid, p in list(self._running.items()):
            p.error = RuntimeError(f"engine step failed: {type(error).__name__}: {error}")
            self.engine.cancel(rid)
            p.done.set()
        self._running.clear()

    def closing(self) -> None:
        for p in self._running.values():  # closed with requests in flight: release their callers
            p.error = RuntimeError("ThreadedEngine closed")
            p.done.set()
