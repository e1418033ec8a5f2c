"""Which models the server serves, loading them on demand and unloading them after an idle keep-alive.

Models are declared when the server starts (`ModelSpec`: a reference `open_engine` understands, the name
clients use, the adapters to load over it). Clients only ever pass names: a name is looked up in this table
and never used as a file path. `base:adapter` (or the adapter's own name, when it is unique) selects an
adapter over its base without reloading the base.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from slmops.errors import BadInputError, SlmopsError
from slmops.serve.scheduler import Scheduler

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str = "model") -> str:
    if not NAME_RE.match(name or ""):
        raise BadInputError(f"invalid {what} name {name!r}",
                            "use letters, digits, '.', '_' and '-' (up to 128 characters, no ':' or '/')")
    return name


ISOLATION = ("auto", "process", "thread")
# an engine worker sends the tokens of consecutive decode steps together when they come faster than this
# (a request's first and last tokens always go at once): a fast model's stream arrives in bursts of a few
# milliseconds instead of paying a process hop per token
STREAM_INTERVAL_S = 0.010


@dataclass
class ModelSpec:
    ref: str  # what open_engine opens: artifact id/alias, folder, .gguf file, URL
    name: str
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> folder/file
    engine_options: dict[str, Any] = field(default_factory=dict)
    # where the engine runs: "process" (an engine worker process, see serve.worker), "thread" (a thread of
    # the server), or "auto": a worker process for the torch engine, whose decode loop holds the GIL
    isolation: str = "auto"


def use_worker_process(spec: ModelSpec, workspace=None) -> bool:
    """Whether `spec` is served from an engine worker process (see `ModelSpec.isolation`)."""
    if spec.isolation not in ISOLATION:
        raise BadInputError(f"isolation {spec.isolation!r} is not one of {', '.join(ISOLATION)}")
    if spec.isolation != "auto":
        return spec.isolation == "process"
    from slmops.engines import engine_kind_of

    try:
        return engine_kind_of(spec.ref, workspace) in ("torch", "adapter")
    except SlmopsError:
        return False  # loading reports it


@dataclass
class Loaded:
    engine: Any
    scheduler: Scheduler
    loaded_at: float
    load_s: float


class ServedModel:
    """One declared model: its spec, and its engine + scheduler while loaded."""

    def __init__(self, spec: ModelSpec, *, workspace=None, max_batch_size: int = 16, max_queue: int = 64,
                 on_batch=None, stream_interval_s: float = 0.0):
        self.spec = spec
        self.stream_interval_s = stream_interval_s
        self.loop = None  # the server's event loop: it reads engine workers' sockets (set by the app)
        self.workspace = workspace
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.loaded: Loaded | None = None
        self.last_used = time.monotonic()
        self.in_flight = 0
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    def load(self) -> Loaded:
        """Open the engine (once; concurrent callers wait for the same load)."""
        with self._lock:
            if self.loaded is not None and getattr(self.loaded.scheduler, "dead", None) is not None:
                crashed, self.loaded = self.loaded, None  # its worker process died: start a new one
                crashed.scheduler.close()
            if self.loaded is not None:
                return self.loaded
            from slmops.engines import open_engine

            t0 = time.perf_counter()
            on_batch = (lambda n: self.on_batch(self.name, n)) if self.on_batch else None
            if use_worker_process(self.spec, self.workspace):
                from slmops.serve.worker import EngineWorker

                worker = EngineWorker(self.spec.ref, name=self.name, adapters=self.spec.adapters,
                                      engine_options=self.spec.engine_options, workspace=self.workspace,
                                      max_batch_size=self.max_batch_size, max_queue=self.max_queue,
                                      on_batch=on_batch, flush_interval_s=self.stream_interval_s,
                                      loop=self.loop)
                self.loaded = Loaded(worker.engine, worker, time.time(), time.perf_counter() - t0)
                self.last_used = time.monotonic()
                log.info("loaded model %s from %s in %.1fs (engine worker pid %d)", self.name, self.spec.ref,
                         self.loaded.load_s, worker.engine.pid)
                return self.loaded
            opts = dict(self.spec.engine_options)
            engine = open_engine(self.spec.ref, workspace=self.workspace, **opts)
            for name, path in self.spec.adapters.items():
                if not hasattr(engine, "load_adapter"):
                    engine.close()
                    raise BadInputError(f"the {engine.name} engine of model {self.name} cannot load adapters")
                engine.load_adapter(name, path)
            scheduler = Scheduler(engine, max_batch_size=self.max_batch_size, max_queue=self.max_queue,
                                  name=self.name, on_batch=on_batch)
            self.loaded = Loaded(engine, scheduler, time.time(), time.perf_counter() - t0)
            self.last_used = time.monotonic()
            log.info("loaded model %s from %s in %.1fs", self.name, self.spec.ref, self.loaded.load_s)
            return self.loaded

    def unload(self, grace_s: float = 0.0) -> bool:
        with self._lock:
            if self.loaded is None:
                return False
            loaded, self.loaded = self.loaded, None
        loaded.scheduler.close(grace_s=grace_s)
        try:
            loaded.engine.close()
        finally:
            gc.collect()
        log.info("unloaded model %s", self.name)
        return True

    def adapters(self) -> list[str]:
        if self.loaded is not None and hasattr(self.loaded.engine, "adapters"):
            return list(self.loaded.engine.adapters)
        return list(self.spec.adapters)


class ModelManager:
    """The server's model table."""

    def __init__(self, specs: list[ModelSpec], *, workspace=None, keep_alive_s: float = 0.0,
                 max_batch_size: int = 16, max_queue: int = 64, on_batch=None,
                 stream_interval_s: float = STREAM_INTERVAL_S):
        self.models: dict[str, ServedModel] = {}
        self.keep_alive_s = keep_alive_s
        for spec in specs:
            check_name(spec.name)
            for a in spec.adapters:
                check_name(a, "adapter")
            if spec.name in self.models:
                raise BadInputError(f"two models are named {spec.name!r}", "give each a name: MODEL=NAME")
            self.models[spec.name] = ServedModel(spec, workspace=workspace, max_batch_size=max_batch_size,
                                                 max_queue=max_queue, on_batch=on_batch,
                                                 stream_interval_s=stream_interval_s)

    def resolve(self, model: str) -> tuple[ServedModel, str | None]:
        """(served model, adapter name or None) for a client's `model` field: NAME, NAME:ADAPTER, or an
        adapter's own name when exactly one model has it. KeyError with a message when unknown."""
        base, _, adapter = model.partition(":")
        if base in self.models:
            served = self.models[base]
            if adapter:
                if adapter not in served.adapters() and adapter != "base":
                    raise KeyError(f"model {base!r} has no adapter {adapter!r} "
                                   f"(adapters: {', '.join(served.adapters()) or 'none'})")
                return served, adapter
            return served, None
        if not adapter:
            owners = [m for m in self.models.values() if model in m.adapters()]
            if len(owners) == 1:
                return owners[0], model
            if len(owners) > 1:
                raise KeyError(f"adapter {model!r} exists on several models; say which: "
                               + ", ".join(f"{m.name}:{model}" for m in owners))
        raise KeyError(f"the model {model!r} does not exist (served: {', '.join(self.listing_ids()) or 'none'})")

    def listing_ids(self) -> list[str]:
        ids = []
        for m in self.models.values():
            ids.append(m.name)
            ids.extend(f"{m.name}:{a}" for a in m.adapters())
        return ids

    def reap_idle(self) -> list[str]:
        """Unload models idle for longer than the keep-alive (0: never). Returns their names."""
        if self.keep_alive_s <= 0:
            return []
        now = time.monotonic()
        gone = []
        for m in self.models.values():
            if m.loaded is not None and m.in_flight == 0 and m.loaded.scheduler.idle \
                    and now - m.last_used > self.keep_alive_s:
                m.unload()
                gone.append(m.name)
        return gone

    def close(self, grace_s: float = 0.0) -> None:
        for m in self.models.values():
            m.unload(grace_s=grace_s)


__all__ = ["ModelManager", "ModelSpec", "ServedModel", "check_name"]
