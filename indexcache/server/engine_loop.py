"""The engine on its own thread. Requests join and leave continuous batching between steps; each step's new tokens
go back to the asyncio side through per-request queues.

All engine calls happen on this thread: the event loop only puts commands (add, abort) on a queue, so the scheduler
never sees concurrent mutation. Adding is bounded: past ``max_waiting`` requests that have not started, ``submit``
refuses with 503 instead of queueing without limit.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine.block_manager import OutOfBlocks
from ..engine.sequence import Status
from ..sampling import SamplingParams
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("indexcache.server")


@dataclass
class Event:
    """New output of one choice since its previous event; the last one has ``finish_reason``."""
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None                 # (logprob, top ids, top logprobs) per new token
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    stop_text: str | None = None                 # the output text cut before a matched stop string
    num_cached_tokens: int = 0
    error: APIError | None = None


class Handle:
    """One choice of one HTTP request, as the engine loop tracks it."""

    def __init__(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                 out: asyncio.Queue, loop: asyncio.AbstractEventLoop):
        self.request_id, self.index, self.prompt_ids, self.params = request_id, index, prompt_ids, params
        self.out, self.loop = out, loop
        self.seq = None
        self.sent = 0                 # output tokens already posted
        self.submitted = time.perf_counter()
        self.last_token_time: float | None = None
        self.cancelled = False        # set on the event loop; the engine thread drops or aborts the request
        self.finished = False         # set on the event loop when the last event was received

    def post(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, ev)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass


class EngineLoop:
    def __init__(self, engine, metrics: Metrics, max_waiting: int):
        if max_waiting < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting}")
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, Handle] = {}
        self._lock = threading.Lock()
        self._queued = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="indexcache-engine", daemon=True)

    # ----- event-loop side ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stop.is_set()

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._queued

    def submit(self, handles: list[Handle]) -> None:
        """Admit every choice of one request, or none (503 when the waiting queue is full)."""
        if not self.alive():
            raise APIError(503, "the engine is not running", type="server_shutdown")
        with self._lock:
            waiting = self.num_waiting()
            if waiting + len(handles) > self.max_waiting:
                self.metrics.rejected += 1
                raise APIError(503, f"the server is busy: {waiting} requests are waiting (limit {self.max_waiting}); "
                               "retry later", type="server_overloaded", headers={"Retry-After": "1"})
            self._queued += len(handles)
            self.metrics.queued = self._queued
        for h in handles:
            self._cmds.put(("add", h))

    def abort(self, handles: list[Handle]) -> None:
        """Stop the unfinished ones (a client went away); their pages are freed before the next step."""
        for h in handles:
            if not h.finished and not h.cancelled:
                h.cancelled = True
                self._cmds.put(("abort", h))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._cmds.put(("wake", None))
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ----- engine thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            try:
                self._drain(block=not eng.has_unfinished())
                if self._stop.is_set() or not eng.has_unfinished():
                    continue
                eng.step()
                self._publish()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(APIError(500, f"the engine failed: {type(e).__name__}: {e}", type="internal_error"))
        self._fail_all(APIError(503, "the server is shutting down", type="server_shutdown"), queued_too=True)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, h: Handle | None) -> None:
        if kind == "add":
            with self._lock:
                self._queued -= 1
                self.metrics.queued = self._queued
            if h.cancelled:
                return
            try:
                h.seq = self.engine.add_request(h.prompt_ids, h.params, request_id=h.request_id)
            except (ValueError, OutOfBlocks) as e:
                h.post(Event(h.index, error=APIError(400, str(e), "prompt")))
                return
            self._active[h.request_id] = h
        elif kind == "abort":
            mine = self._active.pop(h.request_id, None)
            if mine is not None and mine.seq is not None:
                self.engine.abort(mine.seq)
                self.metrics.count_finished("abort", time.perf_counter() - mine.submitted)

    def _publish(self) -> None:
        now = time.perf_counter()
        for rid, h in list(self._active.items()):
            s = h.seq
            n = len(s.output_ids)
            done = s.status is Status.FINISHED
            if n == h.sent and not done:
                continue
            new = s.output_ids[h.sent:n]
            first = h.sent == 0 and n > 0
            itl = None if first or h.last_token_time is None else (now - h.last_token_time) / max(len(new), 1)
            self.metrics.observe_tokens(now - h.submitted if first else None, itl, len(new))
            ev = Event(h.index, new, s.logprobs[h.sent:n] if s.params.logprobs is not None else None,
                       num_cached_tokens=s.num_cached_tokens or 0)
            h.sent, h.last_token_time = n, now
            if done:
                ev.finish_reason, ev.stop_reason = s.finish_reason, s.stop_reason
                if s.finish_reason == "stop" and isinstance(s.stop_reason, str):
                    ev.stop_text = s.text
                del self._active[rid]
                self.metrics.count_finished(s.finish_reason, now - h.submitted)
            h.post(ev)

    def _fail_all(self, err: APIError, queued_too: bool = False) -> None:
        """Fail the requests in the engine (a step failed), and with ``queued_too`` those not yet added."""
        for h in list(self._active.values()):
            try:
                self.engine.abort(h.seq)
            except Exception:  # noqa: BLE001 - the request is failed either way
                log.exception("abort failed")
            h.post(Event(h.index, error=err))
        self._active.clear()
        while queued_too:
            try:
                kind, h = self._cmds.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                with self._lock:
                    self._queued -= 1
                    self.metrics.queued = self._queued
                h.post(Event(h.index, error=err))
