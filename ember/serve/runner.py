"""The engine on a background thread, fed by asyncio request handlers.

    handler ── submit(prompt, params) ──▶ inbox ──▶ engine thread: add / abort, step(), dispatch
       ▲                                                        │
       └──── asyncio.Queue per request ◀── call_soon_threadsafe ┘

One thread owns the engine (torch work never runs on the event loop). Between steps it takes new
requests and aborts from the inbox; each step's deltas go to the queues of their requests, and a
finished request gets its `Request` (usage counts, prompt logprobs) as the last item. A handler whose
client went away calls `abort`, and the sequence's blocks are freed before the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

from ember.errors import EmberError
from ember.infer.engine import Engine, Request, RequestParams, SeqDelta

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Finished:
    """The last item on a request's queue."""

    request: Optional[Request]
    error: Optional[str] = None


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self.failed: Optional[str] = None
        self.in_flight = 0  # submitted, not yet finished (running + waiting in the engine + inbox)
        self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
        # metrics
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.finished_by_reason: dict[str, int] = {}
        self._tok_window: deque[tuple[float, int]] = deque()

    def start(self) -> "EngineRunner":
        self._thread.start()
        return self

    # ------------------------------------------------------------------------------ handlers
    def submit(self, prompt: Sequence[int], params: RequestParams, request_id: str) -> asyncio.Queue:
        """Queue a request; returns the asyncio.Queue its deltas and its `Finished` arrive on."""
        if self.failed:
            raise EmberError(f"the engine stopped: {self.failed}")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._queues[request_id] = (loop, q)
            self._inbox.append(("add", request_id, list(prompt), params))
            self.in_flight += 1
        self._wake.set()
        return q

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id, None, None))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything in flight (each stream ends with finish_reason "abort") and stop the thread."""
        with self._lock:
            for rid in list(self._queues):
                self._inbox.append(("abort", rid, None, None))
            self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --------------------------------------------------------------------------- the thread
    def _loop(self) -> None:
        eng = self.engine
        try:
            while True:
                self._drain()
                if self._stop and not eng.has_unfinished():
                    break
                if not eng.has_unfinished():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                deltas = eng.step()
                self._dispatch(deltas)
        except Exception as e:  # noqa: BLE001 - reported to every waiting client, then the thread ends
            self.failed = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            with self._lock:
                for rid in list(self._queues):
                    self._put(rid, Finished(None, self.failed))
                self._queues.clear()

    def _drain(self) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        for kind, rid, prompt, params in items:
            if kind == "add":
                try:
                    req = self.engine.add_request(prompt, params, request_id=rid)
                except EmberError as e:
                    self._end(rid, Finished(None, str(e)))
                    continue
                if req.finished:  # nothing to generate (max_tokens 0)
                    self._finish(req)
            else:
                req = self.engine.requests.get(rid)
                if req is not None and not req.finished:
                    self.engine.abort(rid)
                    self._finish(req)

    def _dispatch(self, deltas: list[SeqDelta]) -> None:
        now = time.perf_counter()
        self._tok_window.append((now, sum(len(d.token_ids) for d in deltas)))
        while self._tok_window and now - self._tok_window[0][0] > 10.0:
            self._tok_window.popleft()
        done = set()
        for d in deltas:
            self._put(d.request_id, d)
            if d.finished:
                done.add(d.request_id)
        for rid in done:
            req = self.engine.requests.get(rid)
            if req is not None and req.finished:
                self._finish(req)

    def _finish(self, req: Request) -> None:
        if req.first_token_at is not None:
            ttft = req.first_token_at - req.arrived
            self.ttft_sum += ttft
            i = next((i for i, b in enumerate(TTFT_BUCKETS) if ttft <= b), len(TTFT_BUCKETS))
            self.ttft_counts[i] += 1
        for s in req.seqs:
            self.finished_by_reason[s.finish_reason or "unknown"] = self.finished_by_reason.get(
                s.finish_reason or "unknown", 0) + 1
        self.engine.release(req.id)
        self._end(req.id, Finished(req))

    def _end(self, rid: str, item: Finished) -> None:
        self._put(rid, item)
        with self._lock:
            if self._queues.pop(rid, None) is not None:
                self.in_flight -= 1

    def _put(self, rid: str, item) -> None:
        entry = self._queues.get(rid)
        if entry is None:
            return
        loop, q = entry
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutdown)
            pass

    # ------------------------------------------------------------------------------- metrics
    def tokens_per_second(self) -> float:
        w = list(self._tok_window.copy())  # copy (atomic): the engine thread appends to it
        if len(w) < 2:
            return 0.0
        span = w[-1][0] - w[0][0]
        return sum(n for _, n in w[1:]) / span if span > 0 else 0.0
