"""A deliver callback for scheduler tests: collects a request's events (and the times they were decoded,
when the engine worker gives them) until the request ends or fails."""

from __future__ import annotations

import threading


class Collector:
    def __init__(self):
        self.events, self.times = [], []
        self.done = threading.Event()
        self.error = None

    def __call__(self, item, at=None):
        if item is None or isinstance(item, BaseException):
            self.error = item
            self.done.set()
        else:
            self.events.append(item)
            self.times.append(at)

    @property
    def text(self):
        return "".join(e.text for e in self.events)
