"""An engine and its Scheduler in a child process (an "engine worker"), driven from the server.

Why: the torch engine decodes in Python (transformers' modules), holding the GIL for most of each ~1 ms
step. In one process the server's per-token work (waking the event loop, writing the SSE chunk) has to wait
for the GIL and cannot overlap the next step. In a worker process the decode loop runs on its own
interpreter; the server only reads finished steps from a socket. It also keeps the server up when an engine
crashes in native code: the requests in flight fail with 503, and the model loads again on its next request.

The worker is one thread: between decode steps it polls its socket for new requests and cancellations, and
when it has nothing to decode it sleeps on the socket (after a short spin, `IDLE_SPIN_S`). It sends the
events of consecutive steps together when they come faster than `flush_interval_s` (a request's first and
last events always go at once), each stamped with the time it was decoded, so a fast model does not pay a
process hop per token and the server's latency metrics still see the real timing.

`EngineWorker` has the parts of the `Scheduler` interface the server uses (`submit` → a ticket with
`cancel()`, `queue_depth`, `running`, `idle`, `stats`, `retry_after()`, `close(grace_s)`); `.engine` is a
proxy with what the server asks an engine directly (`name`, `info()`, `render`, `tokenize`, `token_text`,
`adapters`). The child is ``python -m slmops.serve.worker FD``; messages are pickled tuples over a socket
pair (`multiprocessing.connection.Connection`):

- server → worker: ``("boot", options)`` once; ``("submit", call, ticket, request, timeout, fit)``,
  ``("cancel", ticket)``, ``("call", call, method, args)``, ``("close", call, grace_s)``.
- worker → server: ``("ready", info)`` or ``("failed", error)`` once after loading; ``("ret", call, ok,
  value)``; ``("events", [(ticket, item, decoded_at), ...], batch_sizes, stats)``.

Errors cross the boundary as (class name, message, hint, extra) and come back as the same slmops error
classes (`Overloaded` keeps its Retry-After, `ContextLengthExceeded` its parameter), so the server answers
exactly as with an in-process engine.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from slmops.engines.base import ContextLengthExceeded
from slmops.errors import BadInputError, NotFoundError, SlmopsError
from slmops.serve.scheduler import Overloaded, RequestTimeout, SchedulerStats, ShuttingDown

log = logging.getLogger(__name__)

CALLS = ("tokenize", "render", "token_text")  # engine methods the server may call in the worker
# after its last request ends, the worker polls its socket for this long before it sleeps on it: waking a
# sleeping process (and an idle CPU) costs a few hundred microseconds per request on a VM, a small model's
# whole prefill; the spin is bounded, so an idle server uses no CPU
IDLE_SPIN_S = 0.005


def default_threads() -> int:
    """CPU threads for an engine in a worker process when none are given: every core this process may use
    but one, which is left to the HTTP server (on 2 cores: 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class EngineCrashed(SlmopsError):
    """The engine's worker process died (a crash in native code, or killed): its requests fail with 503."""


_KNOWN = {c.__name__: c for c in (Overloaded, ShuttingDown, RequestTimeout, EngineCrashed, ContextLengthExceeded,
                                  NotFoundError, BadInputError, SlmopsError)}


def pack_error(exc: BaseException) -> tuple[str, str, str | None, Any]:
    """An exception as plain data: the nearest slmops class in its MRO, message, hint, and the one extra
    field some carry (Overloaded's retry_after, ContextLengthExceeded's param)."""
    name = next((k.__name__ for k in type(exc).__mro__ if k.__name__ in _KNOWN), None)
    message = getattr(exc, "message", None) or str(exc)
    if name is None:
        name, message = "Exception", f"{type(exc).__name__}: {message}"
    extra = getattr(exc, "retry_after", None) if name == "Overloaded" else getattr(exc, "param", None)
    return name, message, getattr(exc, "hint", None), extra


def unpack_error(data: tuple[str, str, str | None, Any]) -> BaseException:
    name, message, hint, extra = data
    if name == "Overloaded":
        return Overloaded(message, retry_after=extra or 1.0)
    if name == "ContextLengthExceeded":
        return ContextLengthExceeded(message, hint, param=extra or "prompt")
    cls = _KNOWN.get(name)
    if cls is None:
        return RuntimeError(message)
    return cls(message, hint)


def token_text(engine: Any, token_id: int) -> str:
    """A token as the text it adds (what logprobs report), for any engine."""
    if hasattr(engine, "token_text"):
        return engine.token_text(token_id)
    if hasattr(engine, "detokenize"):  # llama.cpp: the piece as text, not the vocabulary's spelling
        return engine.detokenize([token_id])
    if engine.name == "torch":
        return engine.tokenizer.decode([token_id])
    return engine.decode([token_id])


# ------------------------------------------------------------------------------------------ server side


class WorkerTicket:
    """A request submitted to a worker; `cancel()` stops it there between decode steps."""

    __slots__ = ("id", "request", "deliver", "_worker", "_cancelled")

    def __init__(self, worker: EngineWorker, tid: int, request, deliver):
        self.id, self.request, self.deliver, self._worker = tid, request, deliver, worker
        self._cancelled = False

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._worker._cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class WorkerEngine:
    """The server's view of the engine in the worker (cached facts; the rest is a call over the socket)."""

    def __init__(self, worker: EngineWorker, ready: dict[str, Any]):
        self._worker = worker
        self.name: str = ready["name"]
        self._info = ready["info"]
        self.adapters: list[str] = list(ready["adapters"])
        self.supports_json_schema: bool = ready.get("json_schema", False)
        self.pid: int = ready["pid"]
        self._texts: dict[int, str] = {}

    def info(self):
        return self._info

    def tokenize(self, text: str) -> list[int]:
        return self._worker.call("tokenize", text)

    def render(self, request) -> str:
        return self._worker.call("render", request)

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._worker.call("token_text", token_id)
        return text

    def close(self) -> None:
        self._worker.close()


class EngineWorker:
    """Starts ``python -m slmops.serve.worker`` with the model, and schedules requests on it (module docs)."""

    def __init__(self, ref: str, *, name: str, adapters: dict[str, str] | None = None,
                 engine_options: dict[str, Any] | None = None, workspace: Any = None, max_batch_size: int = 16,
                 max_queue: int = 64, on_batch=None, flush_interval_s: float = 0.0,
                 load_timeout_s: float = 1800.0, loop=None):
        self.name = name
        self._loop = None  # the event loop that reads the socket, or None: a reader thread does
        self._loop_thread: int | None = None
        self._reader: threading.Thread | None = None
        self._on_batch = on_batch
        self._tickets: dict[int, WorkerTicket] = {}
        self._calls: dict[int, list] = {}  # call id -> [threading.Event, ok, value]
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._retry_after = 1.0
        self.stats = SchedulerStats()
        self.dead: BaseException | None = None
        self._closing = False
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "slmops.serve.worker", str(child_sock.fileno())],
                                         pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            child_sock.close()
        self._conn = Connection(parent_sock.detach())
        options = dict(engine_options or {})
        if not options.get("threads") and not str(ref).startswith(("http://", "https://")):
            options["threads"] = default_threads()
        self._send(("boot", {"ref": ref, "name": name, "adapters": dict(adapters or {}),
                             "engine_options": options,
                             "workspace": str(workspace.root) if workspace is not None else None,
                             "max_batch_size": max_batch_size, "max_queue": max_queue,
                             "flush_interval_s": flush_interval_s}))
        ready = self._handshake(load_timeout_s)
        # the worker's clock -> ours (event times are taken in the worker, when the token was decoded)
        self._clock = time.perf_counter() - ready["clock"]
        self.max_batch_size = ready["max_batch_size"]
        self.engine = WorkerEngine(self, ready)
        if loop is not None and loop.is_running():
            self._attach(loop)
        else:
            self._reader = threading.Thread(target=self._read, name=f"slmops-worker-{name}", daemon=True)
            self._reader.start()

    def _handshake(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.2):
            if self.proc.poll() is not None:
                self._conn.close()
                raise EngineCrashed(f"the engine worker of model {self.name} exited with code "
                                    f"{self.proc.returncode} while loading", "see the server's log above")
            if time.monotonic() > deadline:
                self._kill()
                raise EngineCrashed(f"model {self.name} did not load within {timeout:.0f}s")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._kill()
            raise EngineCrashed(f"the engine worker of model {self.name} exited while loading") from None
        if msg[0] == "failed":
            self._kill()
            raise unpack_error(msg[1])
        return msg[1]

    # --- the Scheduler interface the server uses --------------------------------------------------
    def submit(self, request, deliver, *, timeout: float | None = None, fit: str | None = None) -> WorkerTicket:
        tid = next(self._ids)
        ticket = WorkerTicket(self, tid, request, deliver)
        self._tickets[tid] = ticket  # before sending: its first events may come before the reply
        try:
            self._roundtrip(("submit", None, tid, request, timeout, fit))
        except BaseException as exc:
            self._tickets.pop(tid, None)
            if isinstance(exc, Overloaded):
                self._retry_after = exc.retry_after
            raise
        return ticket

    def retry_after(self) -> float:
        return self._retry_after

    @property
    def queue_depth(self) -> int:
        return self.stats.waiting

    @property
    def running(self) -> int:
        return self.stats.running

    @property
    def idle(self) -> bool:
        return not self._tickets and not self.stats.waiting and not self.stats.running

    def call(self, method: str, *args: Any) -> Any:
        return self._roundtrip(("call", None, method, args))

    def close(self, grace_s: float = 0.0) -> None:
        """Let the worker finish or cancel its requests (as `Scheduler.close`), then end the process."""
        if self._closing:
            return
        self._closing = True
        if self.dead is None:
            try:
                self._roundtrip(("close", None, grace_s), timeout=grace_s + 60)
            except (SlmopsError, OSError, TimeoutError):
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._kill()
        self._detach()
        if self._reader is None and self.dead is None:
            self._lost(EOFError("closed"))  # (the reader thread does this when the socket closes)
        self._conn.close()
        if self._reader is not None:
            self._reader.join(timeout=5)

    # --- plumbing ---------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _roundtrip(self, msg: tuple, timeout: float = 600.0) -> Any:
        if self.dead is not None:
            raise EngineCrashed(f"the engine worker of model {self.name} is gone: {self.dead}",
                                "the model loads again on its next request")
        cid = next(self._ids)
        slot = [threading.Event(), False, None]
        self._calls[cid] = slot
        try:
            self._send((msg[0], cid, *msg[2:]))
        except OSError as exc:
            self._calls.pop(cid, None)
            raise EngineCrashed(f"the engine worker of model {self.name} is gone ({exc})") from None
        if self._read_inline():
            deadline = time.monotonic() + timeout
            try:
                while not slot[0].is_set() and self._conn.poll(max(0.0, deadline - time.monotonic())):
                    self._dispatch(self._conn.recv())
            except (EOFError, OSError) as exc:
                self._detach()
                self._lost(exc)
        if not slot[0].wait(0 if self._read_inline() else timeout):
            self._calls.pop(cid, None)
            raise TimeoutError(f"the engine worker of model {self.name} did not answer {msg[0]} in {timeout:.0f}s")
        if not slot[1]:
            raise unpack_error(slot[2])
        return slot[2]

    def _cancel(self, ticket: WorkerTicket) -> None:
        if self._tickets.pop(ticket.id, None) is not None and self.dead is None:
            try:
                self._send(("cancel", ticket.id))
            except OSError:
                pass

    def _dispatch(self, msg: tuple) -> None:
        """One message from the worker: a step's events (to their tickets) or a call's answer."""
        kind = msg[0]
        if kind == "events":
            self.stats = msg[3]
            clock, tickets = self._clock, self._tickets
            for tid, item, at in msg[1]:
                if type(item) is tuple:
                    item = unpack_error(item)
                t = tickets.get(tid) if item is not None and not isinstance(item, BaseException) \
                    else tickets.pop(tid, None)
                if t is not None:
                    try:
                        t.deliver(item, at + clock)
                    except Exception:  # noqa: BLE001 - one broken consumer must not stop the reader
                        log.exception("delivering to a request failed")
            if self._on_batch is not None:
                for n in msg[2]:
                    self._on_batch(n)
        elif kind == "ret":
            slot = self._calls.pop(msg[1], None)
            if slot is not None:
                slot[1], slot[2] = msg[2], msg[3]
                slot[0].set()

    def _read(self) -> None:
        """The reader thread (when no event loop reads the socket)."""
        try:
            while True:
                self._dispatch(self._conn.recv())
        except (EOFError, OSError) as exc:
            self._lost(exc)

    def _attach(self, loop) -> None:
        """Read the worker's socket on the server's event loop: a message wakes the loop directly, with no
        reader thread (and GIL hand-off) in between."""
        added = threading.Event()

        def add() -> None:
            self._loop_thread = threading.get_ident()
            loop.add_reader(self._conn.fileno(), self._on_readable)
            added.set()

        self._loop = loop
        loop.call_soon_threadsafe(add)
        if not added.wait(30):
            raise EngineCrashed(f"the server's event loop did not take the engine worker of model {self.name}")

    def _on_readable(self) -> None:
        try:
            while self._conn.poll(0):
                self._dispatch(self._conn.recv())
        except (EOFError, OSError) as exc:
            self._detach()
            self._lost(exc)

    def _detach(self) -> None:
        """Stop reading the socket on the event loop (idempotent; from any thread)."""
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            loop.remove_reader(self._conn.fileno())
            return
        removed = threading.Event()

        def remove() -> None:
            loop.remove_reader(self._conn.fileno())
            removed.set()

        try:
            loop.call_soon_threadsafe(remove)
        except RuntimeError:  # the loop is closed
            return
        if loop.is_running():
            removed.wait(10)

    def _read_inline(self) -> bool:
        """Whether a caller waiting for an answer must read the socket itself: it is the event loop's thread
        (which would otherwise be the reader), or the loop that reads it has stopped."""
        loop = self._loop
        return loop is not None and (threading.get_ident() == self._loop_thread or not loop.is_running())

    def _lost(self, exc: BaseException) -> None:
        """The worker's socket closed: fail what is pending (ShuttingDown on unload, else EngineCrashed)."""
        calls, tickets = self._calls, self._tickets
        if self.dead is not None:
            return
        if self._closing:
            err: BaseException = ShuttingDown(f"model {self.name} stopped before the request finished")
        else:
            code = self.proc.poll()
            reason = f"exited with code {code}" if code is not None else f"connection lost ({exc})"
            log.error("the engine worker of model %s %s", self.name, reason)
            err = EngineCrashed(f"the engine of model {self.name} crashed ({reason})",
                                "the model loads again on its next request; see the server's log")
        self.dead = err
        for slot in list(calls.values()):
            slot[1], slot[2] = False, pack_error(err)
            slot[0].set()
        calls.clear()
        for t in list(tickets.values()):
            try:
                t.deliver(err)
            except Exception:  # noqa: BLE001
                log.exception("delivering to a request failed")
        tickets.clear()
        self.stats = SchedulerStats()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ worker side


def _serve(conn: Connection) -> None:
    """The worker process: one thread that reads the server's messages and drives the Scheduler (no thread
    hand-off, no GIL contention: between decode steps it polls the socket, and blocks on it when idle)."""
    from slmops.serve.scheduler import Scheduler

    boot = conn.recv()[1]
    outbox: list[tuple[int, Any, float]] = []
    batch_sizes: list[int] = []
    tickets: dict[int, Any] = {}
    sched: Scheduler | None = None
    interval = float(boot.get("flush_interval_s") or 0.0)
    flushed = {"at": 0.0, "stats": (), "urgent": False}

    def flush() -> None:
        """Send what the last step produced (one message), unless nothing urgent happened (a request's
        first or last event, a change in the queue) and the last send was under `interval` ago."""
        if sched is None:
            return
        st = sched.stats
        key = (st.waiting, sched.running, st.completed, st.cancelled, st.timed_out)
        if not outbox and not batch_sizes and key == flushed["stats"]:
            return
        now = time.perf_counter()
        if not flushed["urgent"] and key == flushed["stats"] and now - flushed["at"] < interval:
            return
        items, sizes = outbox[:], batch_sizes[:]
        outbox.clear()
        batch_sizes.clear()
        flushed.update(at=now, stats=key, urgent=False)
        conn.send(("events", items, sizes, SchedulerStats(st.waiting, key[1], *key[2:], st.steps)))

    def deliverer(tid: int):
        first = [True]

        def deliver(item) -> None:
            if isinstance(item, BaseException):
                item = pack_error(item)
            if item is None or type(item) is tuple:
                tickets.pop(tid, None)
                flushed["urgent"] = True
            elif first[0]:  # the first token goes out at once (time to first token)
                flushed["urgent"] = True
            first[0] = False
            outbox.append((tid, item, time.perf_counter()))
        return deliver

    try:
        from slmops.engines import open_engine

        workspace = None
        if boot["workspace"]:
            from slmops.workspace import Workspace

            workspace = Workspace(boot["workspace"])
        engine = open_engine(boot["ref"], workspace=workspace, **boot["engine_options"])
        for name, path in boot["adapters"].items():
            if not hasattr(engine, "load_adapter"):
                engine.close()
                raise BadInputError(f"the {engine.name} engine of model {boot['name']} cannot load adapters")
            engine.load_adapter(name, path)
        sched = Scheduler(engine, max_batch_size=boot["max_batch_size"], max_queue=boot["max_queue"],
                          name=boot["name"], on_batch=batch_sizes.append, after_step=flush, threaded=False)
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which raises it
        log.exception("loading model %s failed", boot["name"])
        conn.send(("failed", pack_error(exc)))
        return
    conn.send(("ready", {"name": engine.name, "info": engine.info(), "pid": os.getpid(),
                         "clock": time.perf_counter(), "adapters": list(getattr(engine, "adapters", []) or []),
                         "max_batch_size": sched.max_batch_size,
                         "json_schema": bool(getattr(engine, "supports_json_schema", False))}))

    def handle(msg: tuple) -> bool:
        """One message from the server; False on close."""
        kind = msg[0]
        if kind == "cancel":
            t = tickets.pop(msg[1], None)
            if t is not None:
                t.cancel()
            return True
        cid = msg[1]
        try:
            if kind == "submit":
                tid, request, timeout, fit = msg[2], msg[3], msg[4], msg[5]
                tickets[tid] = sched.submit(request, deliverer(tid), timeout=timeout, fit=fit)
                value = None
            elif kind == "call":
                method, args = msg[2], msg[3]
                if method not in CALLS:
                    raise BadInputError(f"the engine worker does not run {method!r}")
                value = token_text(engine, *args) if method == "token_text" else getattr(engine, method)(*args)
            elif kind == "close":
                sched.close(grace_s=msg[2])
                conn.send(("ret", cid, True, None))
                return False
            else:
                raise BadInputError(f"unknown worker message {kind!r}")
            conn.send(("ret", cid, True, value))
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            conn.send(("ret", cid, False, pack_error(exc)))
        return True

    last_busy = 0.0
    try:
        running = True
        while running:
            try:
                # between decode steps only look; when there is nothing to decode, sleep on the socket
                if sched.busy:
                    timeout = 0.0
                    last_busy = time.perf_counter()
                elif time.perf_counter() - last_busy < IDLE_SPIN_S:
                    timeout = 0.0  # a client's next request usually follows within a few ms: stay awake
                else:
                    timeout = 0.5
                while running and conn.poll(timeout):
                    running = handle(conn.recv())
                    timeout = 0.0
            except (EOFError, OSError):  # the server went away: stop
                sched.close()
                break
            if running:
                sched.run_once(wait_s=0)
    finally:
        try:
            engine.close()
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s slmops.worker: %(message)s")
    _serve(Connection(int(argv[0])))


if __name__ == "__main__":
    main()


__all__ = ["EngineCrashed", "EngineWorker", "WorkerEngine", "WorkerTicket", "default_threads", "pack_error",
           "token_text", "unpack_error"]
