"""`slmops serve` as users run it: a subprocess on 127.0.0.1 that answers the openai client, refuses bad
arguments before loading anything, prints the vLLM command, and shuts down cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from slmops.cli.app import run

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess_answers_and_stops_gracefully(tiny_model_dir, tmp_path):
    port = _port()
    env = {**os.environ, "PYTHONPATH": SRC, "SLMOPS_API_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "slmops", "-w", str(tmp_path / "ws"), "serve",
                             f"{tiny_model_dir}=tiny", "--port", str(port), "--grace", "20"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        result = {}

        def long_request():  # in flight when SIGTERM arrives: finishes, is not cut off
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=150, stop=["\x00never"])
            result["tokens"] = r.usage.completion_tokens

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status is the signal's
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert result.get("tokens", 0) > 0
        err = proc.stderr.read()
        assert '"path": "/v1/chat/completions", "status": 200' in err  # the JSON access log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_arguments_fail_before_loading(tmp_path, capsys):
    ws = ["-w", str(tmp_path / "ws")]
    assert run([*ws, "serve", "a=x", "b=x", "--dry-run"]) == 2
    assert "two models are named 'x'" in capsys.readouterr().err
    assert run([*ws, "serve", "m=bad/name", "--dry-run"]) == 2
    assert run([*ws, "serve", "a=one", "b=two", "--adapter", "lora=dir", "--dry-run"]) == 2
    assert "say which model" in capsys.readouterr().err
    assert run([*ws, "serve", "a=one", "--adapter", "base=dir", "--dry-run"]) == 2


def test_dry_run_and_vllm_command(tmp_path, tiny_model_dir, capsys):
    ws = ["-w", str(tmp_path / "ws")]
    assert run([*ws, "serve", f"{tiny_model_dir}=tiny", "--adapter", "gifts=/x/gifts", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tiny:" in out and "adapter gifts = /x/gifts" in out
    assert run([*ws, "serve", f"{tiny_model_dir}=tiny", "--engine", "vllm", "--dry-run", "--api-key", "s3"]) == 0
    out = capsys.readouterr().out
    assert "vllm.entrypoints.openai.api_server" in out and "--served-model-name tiny" in out and "s3" not in out


@pytest.mark.parametrize("value", ["nonsense"])
def test_unknown_engine(tmp_path, tiny_model_dir, value):
    assert run(["-w", str(tmp_path / "ws"), "serve", str(tiny_model_dir), "--engine", value]) == 2
