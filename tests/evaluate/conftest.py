"""Fixtures for evaluation tests: demo-task data files and an in-thread slmops server."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_records() -> list[dict]:
    """8 demo-task chat records (user message + reference JSON answer)."""
    from slmops.demo.task import generate, to_chat_row

    return [to_chat_row(ex) for ex in generate(8, seed=5)]


@pytest.fixture()
def demo_file(tmp_path, demo_records) -> Path:
    return write_records(tmp_path / "demo.jsonl", demo_records)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A real uvicorn server on 127.0.0.1 in a thread of the test process (the pattern of tests/serve)."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture()
def serve_model():
    """serve_model(ref, name) -> RunningServer serving one model through slmops' own server."""
    from slmops.serve.app import ServerConfig, create_app
    from slmops.serve.manager import ModelManager, ModelSpec

    running = []

    def start(ref, name):
        srv = RunningServer(create_app(ModelManager([ModelSpec(ref=str(ref), name=name)]), ServerConfig()))
        running.append(srv)
        return srv

    yield start
    for srv in running:
        srv.stop()
