"""A small OpenAI-compatible server for tests (stdlib only), run in a subprocess so a test can kill it.

    python tests/support/fake_openai.py --port 0 --fail-rate 0.2 --latency 0.05

prints ``PORT <n>`` on its first line once it listens on 127.0.0.1. Endpoints: ``GET /v1/models``,
``POST /v1/chat/completions`` and ``/v1/completions`` (with ``stream: true`` as server-sent events), and
``GET /stats`` (requests seen, failures injected, the most requests in flight at once, arrival times).

The answer is deterministic: ``{"echo": <the last user message, first 40 chars>, "n": <its length>}``
(``--answer text`` gives ``"Answer: <echo>"``). ``max_tokens`` counts characters: a longer answer is cut
with ``finish_reason: "length"``. A model other than ``--model`` gets a 400 with an OpenAI-style error.

Faults: ``--fail-rate P`` fails that share of completion calls at random (``--fail-modes`` among 429, 500
and ``drop``: the connection is closed without an answer); ``--fail-first N`` fails the first N attempts of
every distinct request body (deterministic flakiness); ``--retry-after S`` adds a Retry-After header to
429 answers.

The module is also importable: :class:`FakeServer` starts/stops/kills the subprocess.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def answer_for(messages_or_prompt, kind: str = "json") -> str:
    """The fake's deterministic answer for a prompt (tests compute the expected text with it)."""
    if isinstance(messages_or_prompt, list):
        users = [m["content"] for m in messages_or_prompt if m.get("role") == "user"]
        text = users[-1] if users else ""
    else:
        text = str(messages_or_prompt)
    if kind == "text":
        return f"Answer: {text[:40]}"
    return json.dumps({"echo": text[:40], "n": len(text)})


class _State:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.failures = 0
        self.inflight = 0
        self.max_inflight = 0
        self.arrivals: list[float] = []
        self.attempts: dict[str, int] = {}


def make_handler(state: _State):
    args = state.args

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

        def log_message(self, *a):  # quiet
            pass

        def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": args.model, "object": "model"}]})
            elif self.path == "/stats":
                with state.lock:
                    self._json(200, {"requests": state.requests, "failures": state.failures,
                                     "max_inflight": state.max_inflight, "arrivals": state.arrivals})
            else:
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            chat = self.path.rstrip("/") == "/v1/chat/completions"
            if not chat and self.path.rstrip("/") != "/v1/completions":
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            if args.api_key and self.headers.get("Authorization") != f"Bearer {args.api_key}":
                self._json(401, {"error": {"message": "Incorrect API key provided", "type": "auth"}})
                return
            try:
                body = json.loads(raw)
            except ValueError:
                self._json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                return
            with state.lock:
                state.requests += 1
                state.arrivals.append(time.time())
                state.inflight += 1
                state.max_inflight = max(state.max_inflight, state.inflight)
                key = hashlib.sha256(raw).hexdigest()
                seen = state.attempts.get(key, 0)
                state.attempts[key] = seen + 1
                fail = seen < args.fail_first or state.rng.random() < args.fail_rate
                mode = state.rng.choice(args.fail_modes.split(",")) if fail else None
                if fail:
                    state.failures += 1
            try:
                if args.latency:
                    time.sleep(args.latency)
                self._complete(body, chat, mode)
            finally:
                with state.lock:
                    state.inflight -= 1

        def _complete(self, body: dict, chat: bool, mode: str | None) -> None:
            if mode == "drop":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if mode == "429":
                headers = {"Retry-After": str(args.retry_after)} if args.retry_after is not None else {}
                self._json(429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}}, headers)
                return
            if mode == "500":
                self._json(500, {"error": {"message": "injected failure", "type": "server_error"}})
                return
            if body.get("model") != args.model:
                self._json(400, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "invalid_request_error"}})
                return
            max_tokens = body.get("max_tokens") or 10_000
            if not isinstance(max_tokens, int) or max_tokens < 1:
                self._json(400, {"error": {"message": "max_tokens must be at least 1",
                                           "type": "invalid_request_error"}})
                return
            source = body.get("messages") if chat else body.get("prompt", "")
            text = answer_for(source, args.answer)
            finish = "stop"
            if len(text) > max_tokens:
                text, finish = text[:max_tokens], "length"
            prompt_tokens = len(json.dumps(source))
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(text),
                     "total_tokens": prompt_tokens + len(text)}
            if body.get("stream"):
                self._stream(text, finish, usage, chat, bool((body.get("stream_options") or {}).get("include_usage")))
                return
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish})
            self._json(200, {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": args.model, "choices": [choice],
                             "usage": usage})

        def _stream(self, text: str, finish: str, usage: dict, chat: bool, include_usage: bool) -> None:
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()

            def event(choice_delta: dict | None, finish_reason=None, extra=None) -> None:
                choices = []
                if choice_delta is not None:
                    c = {"index": 0, "finish_reason": finish_reason}
                    c.update({"delta": choice_delta} if chat else {"text": choice_delta.get("content", "")})
                    choices.append(c)
                chunk = {"id": "cmpl-fake", "model": args.model, "choices": choices, **(extra or {})}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            if chat:
                event({"role": "assistant", "content": ""})
            for i in range(0, len(text), 4):
                event({"content": text[i:i + 4]})
            event({"content": ""}, finish_reason=finish)
            if include_usage:
                event(None, extra={"usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="fake-teacher")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--fail-rate", type=float, default=0.0)
    ap.add_argument("--fail-modes", default="429,500,drop")
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--retry-after", type=float, default=None)
    ap.add_argument("--answer", choices=["json", "text"], default="json")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    ThreadingHTTPServer.request_queue_size = 256  # the default backlog (5) drops connects under concurrency
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(_State(args)))
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.05)


class FakeServer:
    """The fake server in a subprocess: ``with FakeServer(fail_rate=0.2) as srv: srv.url``."""

    def __init__(self, port: int = 0, **opts):
        self.opts = opts
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeServer:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--port", str(self.port)]
        for k, v in self.opts.items():
            if v is not None:
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        for _ in range(50):  # re-binding a port just freed can take a moment
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = self.proc.stdout.readline()
            if line.startswith("PORT "):
                self.port = int(line.split()[1])
                return self
            self.proc.wait()
            time.sleep(0.1)
        raise RuntimeError(f"fake server did not start: {self.proc.stderr.read()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.loads(r.read())

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


if __name__ == "__main__":
    main()
