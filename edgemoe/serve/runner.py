"""One generation at a time, in one worker thread, with a bounded queue in front.

An edge device has one model and a few cores: two generations at once would each run at half
speed and double the KV memory, so requests wait in line (at most `max_waiting`; more get 429).
The worker turns a backend's `StepEvent` stream into text pieces for the request's asyncio
queue; a request that goes away sets its job's `cancelled`, and the worker stops the stream
before the next token (the backend's one-stream lock is free again at once).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from edgemoe.serve.errors import APIError
from edgemoe.serve.metrics import Metrics, ServerState, Totals
from edgemoe.tui.prompt import Sampling

CLOSE_WAIT_S = 60.0  # closing waits this long for a token in flight (a big model's token can take seconds)


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str          # "stop" (end of sequence or a stop sequence), "length" (max_tokens), "cancelled"
    totals: Totals       # this request's tokens and cache counters
    ttft_s: float        # prefill until the first token
    decode_tps: float


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


class StopText:
    """Cuts streamed text at the first stop sequence, holding back a tail that could be the
    start of one (so no part of a stop sequence is ever sent)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to send, whether a stop sequence was reached)."""
        buf = self.held + text
        found = [buf.find(s) for s in self.stops if s in buf]
        if found:
            self.held = ""
            return buf[:min(found)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class Job:
    ids: list[int]
    sampling: Sampling
    stops: tuple[str, ...]
    endpoint: str
    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_s: float = field(default_factory=time.perf_counter)

    def put(self, item) -> None:
        """From the worker thread: hand an item to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()


class Runner:
    def __init__(self, backend, metrics: Metrics, max_waiting: int = 8):
        self.backend, self.metrics, self.max_waiting = backend, metrics, max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._current: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="edgemoe-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            # idle, one more may queue: the worker takes it at once
            if len(self._waiting) >= self.max_waiting + (self._current is None):
                raise APIError(429, f"the server is busy: one generation runs and {len(self._waiting)} requests "
                                    f"wait (the queue holds {self.max_waiting}, --queue); retry later",
                               code="queue_full", headers={"Retry-After": "1"})
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it still waits, else stop it at the next token."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.request_done(job.endpoint, "cancelled")

    def state(self, residency: bool = True) -> ServerState:
        """`residency`: also ask the backend for its resident set (takes the cache's lock: call it
        off the event loop)."""
        with self._cond:
            generating, waiting = self._current is not None, len(self._waiting)
        cache = self.backend.residency() if residency and self.backend.controls_cache else None
        return ServerState(generating, waiting, self.max_waiting, cache)

    def close(self) -> None:
        """Refuse the waiting, stop the running generation at its next token, end the worker."""
        with self._cond:
            self._closed = True
            while self._waiting:
                self._waiting.popleft().put(Failed(503, "the server is shutting down"))
            if self._current is not None:
                self._current.cancelled.set()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(CLOSE_WAIT_S)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._current = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._current = None

    def _run(self, job: Job) -> None:
        wait_s = time.perf_counter() - job.submitted_s
        totals, stop, reason = Totals(), StopText(job.stops), ""
        first = last = None
        stream = self.backend.stream(job.ids, job.sampling)
        try:
            for event in stream:
                self.metrics.add(event)
                totals.add(event)
                first, last = first or event, event
                text, hit = stop.feed(event.text)
                if text:
                    job.put(Piece(text))
                if hit or event.finish_reason:
                    reason = "stop" if hit else event.finish_reason
                    break
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
        except Exception as exc:  # the engine failed (a truncated file, a native error): this request only
            self.metrics.request_done(job.endpoint, "error", wait_s)
            job.put(Failed(500, f"generation failed: {type(exc).__name__}: {exc}"))
            return
        finally:
            stream.close()  # stops the backend between tokens and frees its one-stream lock
        if reason in ("stop", "length") and stop.held:
            job.put(Piece(stop.flush()))  # a stop sequence that never completed is text after all
        # counted before the client hears the end: a scrape right after it sees this request
        self.metrics.request_done(job.endpoint, "cancelled" if reason == "cancelled" else "ok", wait_s)
        job.put(Finished(reason or "stop", totals, first.elapsed_s if first else 0.0,
                         last.tokens_per_s if last else 0.0))
