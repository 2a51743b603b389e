"""One Engine shared by many threads: `generate` blocks its caller while a background thread steps
the engine, so concurrent callers (an eval's agent loops, say) are batched together.

    shared = ThreadedEngine(Engine(model, tok, max_batch=32))
    ids, reason, usage = shared.generate(prompt_ids, SamplingParams(max_new_tokens=64, stop_ids=(eos,)))
    shared.close()

A request the engine refuses raises its ValueError in the calling thread; a failed step raises
a RuntimeError in every caller whose request was running (and the engine thread goes on).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from xinzhou.engine.sampling import Guide, SamplingParams
from xinzhou.engine.scheduler import Engine, Finished, Token, Usage


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


class ThreadedEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[_Pending] = queue.Queue()
        self._running: dict[int, _Pending] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="xinzhou-engine", daemon=True)
        self._thread.start()

    def generate(self, prompt: list[int], params: SamplingParams,
                 guide: Guide | None = None) -> tuple[list[int], str, Usage]:
        """(generated ids, finish reason, usage) of one request; blocks until it finishes."""
        if self._stop:
            raise RuntimeError("ThreadedEngine.generate after close()")
        p = _Pending(list(prompt), params, guide)
        self._inbox.put(p)
        self._wake.set()
        p.done.wait()
        if p.error is not None:
            raise p.error
        return p.ids, p.reason, p.usage  # type: ignore[return-value]

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> ThreadedEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop:
            while True:
                try:
                    p = self._inbox.get_nowait()
                except queue.Empty:
                    break
                try:
                    self._running[self.engine.add_request(p.prompt, p.params, guide=p.guide)] = p
                except ValueError as e:
                    p.error = e
                    p.done.set()
            if not self.engine.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - reported to the callers, the thread goes on
                for rid, p in list(self._running.items()):
                    p.error = RuntimeError(f"engine step failed: {type(e).__name__}: {e}")
                    self.engine.cancel(rid)
                    p.done.set()
                self._running.clear()
                continue
            for ev in events:
                p = self._running.get(ev.request_id)
                if p is None:
                    continue
                if isinstance(ev, Token):
                    p.ids.append(ev.token_id)
                elif isinstance(ev, Finished):
                    p.reason, p.usage = ev.reason, ev.usage
                    del self._running[ev.request_id]
                    p.done.set()
        for p in self._running.values():  # closed with requests in flight: release their callers
            p.error = RuntimeError("ThreadedEngine closed")
            p.done.set()
