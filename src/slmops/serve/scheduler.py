"""The scheduler in front of one engine: a bounded queue, batching, cancellation, timeouts, shutdown.

One worker thread owns the engine (or, with ``threaded=False``, the owner drives it with `run_once`: the
engine worker process does, between reads of its socket). Requests are `submit`ted from any thread (the
server's event loop) and get their tokens back through a callback, one `TokenEvent` per decode step, then `None` (done) or an
exception.

- Continuous batching (engines with ``open_batch``, e.g. torch): new requests join the running batch
  between decode steps, finished or cancelled ones leave it, so throughput grows with concurrency and a
  new request does not wait for a long one to finish. One running batch per adapter; batches of
  different adapters take turns step by step, so requests for several adapters are in flight at once.
- Static batching (engines with ``decode_batch(rows, adapter)``, e.g. onnxruntime-genai): waiting requests with
  the same adapter start together (up to ``max_batch_size``) and run to completion; llama.cpp runs one
  request at a time (``max_batch_size = 1`` for that engine).

A full queue raises `Overloaded` (HTTP 429 with Retry-After); each request may have a deadline (its
`TimeoutError`); `Ticket.cancel()` (a client that went away) drops the request between decode steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from slmops.engines.base import ContextLengthExceeded, GenerationRequest, TokenEvent, prompt_too_long
from slmops.engines.decoding import Row, step_event
from slmops.errors import SlmopsError

log = logging.getLogger(__name__)

Deliver = Callable[[TokenEvent | BaseException | None], None]


def fit_context(row: Row, context: int, *, strict: bool) -> None:
    """Make `row` (a prepared request) fit `context` tokens; see `Scheduler.submit`'s `fit`."""
    n = len(row.prompt_ids)
    if n >= context:
        raise prompt_too_long(n, context)
    want = row.request.max_new_tokens
    if n + want > context:
        if strict:
            raise ContextLengthExceeded(f"the model's context is {context} tokens: the prompt ({n}) plus "
                                        f"max_tokens ({want}) do not fit", f"ask for at most {context - n} tokens",
                                        param="max_tokens")
        row.request = replace(row.request, max_new_tokens=context - n)


class Overloaded(SlmopsError):
    """The queue is full: retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message, "retry later, or start the server with a larger --max-queue")
        self.retry_after = retry_after


class ShuttingDown(SlmopsError):
    """The scheduler no longer accepts requests (the server is stopping or the model is unloading)."""


class RequestTimeout(SlmopsError):
    """The request ran past its deadline."""


@dataclass(eq=False)
class Ticket:
    """One submitted request. `deliver` is called from the worker thread."""

    request: GenerationRequest
    adapter: str | None  # resolved adapter name (None: base model)
    deliver: Deliver
    deadline: float | None = None
    row: Row | None = None
    submitted: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (between decode steps); nothing more is delivered."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class SchedulerStats:
    waiting: int = 0
    running: int = 0
    completed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    steps: int = 0


class Scheduler:
    """Owns `engine` on a worker thread; see the module docs. With ``threaded=False`` there is no thread:
    the owner drives it with `run_once` (the process worker, whose one thread also reads its socket)."""

    def __init__(self, engine: Any, *, max_batch_size: int = 16, max_queue: int = 64, name: str = "",
                 on_batch: Callable[[int], None] | None = None, continuous: bool = True,
                 after_step: Callable[[], None] | None = None, threaded: bool = True):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.engine = engine
        self.name = name or getattr(engine, "name", "engine")
        self.max_queue = max_queue
        self.max_batch_size = max(1, min(max_batch_size, int(getattr(engine, "max_batch_size", max_batch_size))))
        self._open_batch = getattr(engine, "open_batch", None) if continuous else None
        self.context_length = engine.info().context_length if hasattr(engine, "info") else None
        self._on_batch = on_batch
        self._after_step = after_step  # called on the worker thread after each step (the process worker flushes)
        self._waiting: deque[Ticket] = deque()
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self.stats = SchedulerStats()
        self._running = 0
        self._avg_request_s = 1.0  # for Retry-After
        self._batches: dict[str | None, Any] = {}  # continuous: adapter -> running batch
        self._static: list[Any] = []  # static: [(tickets, steps iterator)]
        self._active: dict[int, Ticket] = {}  # id(row) -> ticket
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name=f"slmops-scheduler-{self.name}", daemon=True)
            self._thread.start()

    # --- client side ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, deliver: Deliver, *, timeout: float | None = None,
               fit: str | None = None) -> Ticket:
        """Queue `request`. Raises BadInputError (bad request: unknown adapter, prompt longer than the
        context) before queueing, `Overloaded` when the queue is full, `ShuttingDown` when closing.

        `fit` checks the request against the model's context: "clamp" lowers max_new_tokens to what is
        left of the context after the prompt, "strict" raises `ContextLengthExceeded` instead (a client that
        asked for that many tokens); None leaves it to the engine."""
        adapter = self.engine.resolve_adapter(request.adapter)
        row = self.engine.prepare(request)  # tokenizes: errors surface here, to the caller
        if fit is not None and self.context_length:
            fit_context(row, self.context_length, strict=fit == "strict")
        ticket = Ticket(request=request, adapter=adapter, deliver=deliver, row=row,
                        deadline=time.perf_counter() + timeout if timeout else None)
        with self._cv:
            if not self._accepting:
                raise ShuttingDown(f"model {self.name} is shutting down", "retry against a running server")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch_size - self._running):
                raise Overloaded(f"model {self.name} is overloaded: {len(self._waiting)} requests are waiting",
                                 retry_after=self.retry_after())
            self._waiting.append(ticket)
            self.stats.waiting = len(self._waiting)
            self._cv.notify()
        return ticket

    def retry_after(self) -> float:
        """Seconds a client should wait before retrying (about one batch's time)."""
        return max(1.0, min(60.0, round(self._avg_request_s, 1)))

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    @property
    def idle(self) -> bool:
        return not self._waiting and self._running == 0

    def close(self, grace_s: float = 0.0) -> None:
        """Stop accepting; let in-flight and queued work finish for up to `grace_s` seconds, then cancel
        what is left (each gets `ShuttingDown`) and stop the worker."""
        with self._cv:
            self._accepting = False
            self._cv.notify_all()
        end = time.perf_counter() + grace_s
        while grace_s > 0 and not self.idle and time.perf_counter() < end:
            if self._thread is None:
                self.run_once(wait_s=0)
            else:
                time.sleep(0.02)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        else:
            self._drain()

    # --- worker -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while self.run_once(wait_s=0.5):
            pass
        self._drain()

    @property
    def busy(self) -> bool:
        """Requests are waiting or running: `run_once` has work."""
        return bool(self._waiting or self._active)

    def run_once(self, wait_s: float = 0.0) -> bool:
        """One round of the worker: admit waiting requests, run one decode step, deliver its events. Waits up
        to `wait_s` for work when there is none. False once the scheduler is stopped."""
        active, batches, static = self._active, self._batches, self._static
        if self._waiting or not active or self._stop:  # (unlocked peek: the common decode step skips the lock)
            with self._cv:
                if not self._stop and not self._waiting and not active and wait_s > 0:
                    self._cv.wait(timeout=wait_s)
                if self._stop:
                    return False
                admitted = self._take(active, batches, static)
            if not admitted and not active:
                if self._after_step is not None:  # (a queued request may have timed out)
                    self._after_step()
                return True
        else:
            admitted = []
        try:
            if self._open_batch is not None:
                self._continuous_step(admitted, batches, active)
            else:
                self._static_step(admitted, static, active)
        except Exception as exc:  # noqa: BLE001 - an engine failure fails its requests, not the server
            log.exception("engine %s failed during a decode step", self.name)
            for t in list(active.values()):
                self._finish(t, exc, active)
            batches.clear()
            static.clear()
        self._running = len(active)
        if self._after_step is not None:
            self._after_step()
        return True

    def _drain(self) -> None:
        """After stopping: every request still queued or running gets `ShuttingDown`."""
        for t in list(self._active.values()) + list(self._waiting):
            self._safe_deliver(t, ShuttingDown(f"model {self.name} stopped before the request finished"))
        self._active.clear()
        self._waiting.clear()
        self._running = 0
        if self._after_step is not None:
            self._after_step()

    def _take(self, active: dict[int, Ticket], batches: dict, static: list) -> list[Ticket]:
        """Waiting tickets that start now (under the lock)."""
        taken: list[Ticket] = []
        now = time.perf_counter()
        keep: deque[Ticket] = deque()
        while self._waiting:  # drop cancelled / expired ones still in the queue
            t = self._waiting.popleft()
            if t.cancelled:
                self.stats.cancelled += 1
            elif t.deadline is not None and now > t.deadline:
                self.stats.timed_out += 1
                self._safe_deliver(t, RequestTimeout("the request timed out while waiting in the queue"))
            else:
                keep.append(t)
        self._waiting = keep
        if self._open_batch is not None:
            room = self.max_batch_size - len(active)
            while self._waiting and room > 0:
                taken.append(self._waiting.popleft())
                room -= 1
        elif not static and self._waiting:
            first = self._waiting[0]
            for t in list(self._waiting):
                if len(taken) >= self.max_batch_size:
                    break
                if t.adapter == first.adapter:
                    taken.append(t)
                    self._waiting.remove(t)
        self.stats.waiting = len(self._waiting)
        return taken

    def _continuous_step(self, admitted: list[Ticket], batches: dict, active: dict[int, Ticket]) -> None:
        if not admitted and len(batches) == 1:  # the common step: one running batch, nobody joining
            batch = next(iter(batches.values()))
            if self._on_batch:
                self._on_batch(len(batch))
            batch.step()
            self.stats.steps += 1
            self._emit(batch.rows, batch, active)
            if not len(batch):
                batches.clear()
            return
        by_adapter: dict[str | None, list[Ticket]] = {}
        for t in admitted:
            by_adapter.setdefault(t.adapter, []).append(t)
        for adapter, tickets in by_adapter.items():
            batch = batches.get(adapter)
            if batch is None:
                batch = batches[adapter] = self._open_batch(adapter)
            for t in tickets:
                active[id(t.row)] = t
            batch.admit([t.row for t in tickets])
            self._emit([t.row for t in tickets], batch, active)
        for adapter, batch in list(batches.items()):
            if adapter in by_adapter or not len(batch):
                continue
            if self._on_batch:
                self._on_batch(len(batch))
            batch.step()
            self.stats.steps += 1
            self._emit(list(batch.rows), batch, active)
        for adapter in [a for a, b in batches.items() if not len(b)]:
            del batches[adapter]

    def _emit(self, rows: list[Row], batch: Any, active: dict[int, Ticket]) -> None:
        """Deliver each row's step event; drop finished, cancelled and expired rows from `batch`."""
        gone = []
        now = time.perf_counter()
        for row in list(rows):
            t = active.get(id(row))
            if t is None:
                continue
            if t.cancelled:
                self.stats.cancelled += 1
                active.pop(id(row), None)
                gone.append(row)
                continue
            if t.deadline is not None and now > t.deadline:
                self.stats.timed_out += 1
                self._finish(t, RequestTimeout("the request ran past its timeout"), active)
                gone.append(row)
                continue
            self._safe_deliver(t, step_event(row))
            if row.finish_reason:
                self._finish(t, None, active)
                gone.append(row)
        if gone and batch is not None:
            batch.drop(gone)

    def _static_step(self, admitted: list[Ticket], static: list, active: dict[int, Ticket]) -> None:
        if admitted:
            for t in admitted:
                active[id(t.row)] = t
            rows = [t.row for t in admitted]
            decode = self.engine.decode_batch(rows, admitted[0].adapter)
            static.append((admitted, decode))
            if self._on_batch:
                self._on_batch(len(rows))
        if not static:
            return
        tickets, decode = static[0]
        live = [t for t in tickets if id(t.row) in active]
        if not live or all(t.cancelled for t in live):
            decode.close()
            for t in live:
                self.stats.cancelled += 1
                active.pop(id(t.row), None)
            static.pop(0)
            return
        try:
            next(decode)
        except StopIteration:
            pass
        self.stats.steps += 1
        self._emit([t.row for t in live], None, active)
        if not any(id(t.row) in active for t in tickets):
            decode.close()
            static.pop(0)

    def _finish(self, t: Ticket, error: BaseException | None, active: dict[int, Ticket]) -> None:
        active.pop(id(t.row), None)
        if error is None:
            self.stats.completed += 1
            took = time.perf_counter() - t.submitted
            self._avg_request_s = 0.8 * self._avg_request_s + 0.2 * took
        self._safe_deliver(t, error)

    @staticmethod
    def _safe_deliver(t: Ticket, item: TokenEvent | BaseException | None) -> None:
        if t.cancelled and not isinstance(item, BaseException):
            return
        try:
            t.deliver(item)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the worker
            log.exception("delivering to a request failed")


__all__ = ["Overloaded", "fit_context", "RequestTimeout", "Scheduler", "SchedulerStats", "ShuttingDown", "Ticket"]
