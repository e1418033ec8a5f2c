"""Prometheus metrics of the server (one registry per app, so several servers in one process don't mix)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


def rss_bytes(pid: int | str = "self") -> float:
    """Resident memory of a process (default: this one)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 if pid == "self" else 0.0


class ServerMetrics:
    def __init__(self, manager=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slmops_requests", "Finished requests by model, adapter, endpoint and HTTP status",
                                ["model", "adapter", "endpoint", "status"], registry=r)
        self.ttft = Histogram("slmops_time_to_first_token_seconds", "Time from request to first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("slmops_inter_token_latency_seconds", "Time between consecutive generated tokens",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("slmops_request_duration_seconds", "End-to-end request latency",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("slmops_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("slmops_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.batch_size = Histogram("slmops_batch_size", "Requests in a batch per decode step", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("slmops_queue_depth", "Requests waiting for a batch slot", ["model"], registry=r)
        self.running = Gauge("slmops_running_requests", "Requests being generated", ["model"], registry=r)
        self.loaded = Gauge("slmops_model_loaded", "1 when the model is loaded", ["model"], registry=r)
        self.memory = Gauge("slmops_engine_memory_bytes", "Resident memory of the server process and its engine "
                            "worker processes, which hold the loaded engines", registry=r)
        self.memory.set_function(self.memory_bytes)
        self.manager = manager

    def memory_bytes(self) -> float:
        total = rss_bytes()
        for m in (self.manager.models.values() if self.manager is not None else ()):
            pid = getattr(m.loaded.engine, "pid", None) if m.loaded is not None else None
            if pid:
                total += rss_bytes(pid)
        return total

    def refresh(self) -> None:
        """Update the gauges read from the schedulers (called before each scrape)."""
        if self.manager is None:
            return
        for m in self.manager.models.values():
            loaded = m.loaded
            self.loaded.labels(m.name).set(1 if loaded else 0)
            self.queue_depth.labels(m.name).set(loaded.scheduler.queue_depth if loaded else 0)
            self.running.labels(m.name).set(loaded.scheduler.running if loaded else 0)


__all__ = ["ServerMetrics", "rss_bytes"]
