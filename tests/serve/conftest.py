"""Fixtures for server tests: a real uvicorn server on 127.0.0.1 (in a thread of the test process, so the
tiny model loads once), and LoRA adapters on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..export.conftest import make_lora
from ..support.server import RunningServer


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-loras")
    return {"gifts": make_lora(tiny_model_dir, root / "gifts", seed=1),
            "subs": make_lora(tiny_model_dir, root / "subs", seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj"))}


@pytest.fixture()
def start_server():
    """start_server(specs, **ServerConfig options, keep_alive_s=, max_queue=, max_batch_size=) -> RunningServer."""
    from slmops.serve.app import ServerConfig, create_app
    from slmops.serve.manager import ModelManager

    running = []

    def start(specs, *, keep_alive_s=0.0, max_queue=64, max_batch_size=16, **config):
        manager = ModelManager(specs, keep_alive_s=keep_alive_s, max_queue=max_queue, max_batch_size=max_batch_size)
        srv = RunningServer(create_app(manager, ServerConfig(**config)))
        srv.manager = manager
        running.append(srv)
        return srv

    yield start
    for srv in running:
        srv.stop()
