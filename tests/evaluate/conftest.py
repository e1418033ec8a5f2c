"""Fixtures for evaluation tests: demo-task data files and an in-thread slmops server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..support.server import RunningServer


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
