"""Serving benchmark: the OpenAI-compatible server against the same engine called in-process, and against
llama-cpp-python's own server, at concurrency 1, 4 and 16; then a soak with malformed requests.

One run, on this machine (the ONNX and GGUF engines with 2 threads; the torch engine, in the server's engine
worker process and in-process alike, with `slmops serve`'s default for a worker: all cores but one, i.e. 1):
  * engines: the demo student (torch engine, HF folder: the distillation benchmark's student when it exists,
    else a quickly trained one), the Qwen2.5-0.5B-shaped preset with random weights exported to int4 ONNX
    (ort-genai engine) and to q4_k_m GGUF (llama.cpp engine); the same GGUF also served by llama-cpp-python's
    own OpenAI server (`python -m llama_cpp.server`);
  * every server is a subprocess (the load generator never shares its GIL); the load generator is a minimal
    asyncio HTTP/1.1 client (`LeanHTTP`, on uvloop) sending streaming chat requests with fixed demo-task
    prompts, temperature 0 and a fixed max_tokens, keeping `concurrency` requests in flight; it parses only
    the events it needs (first content, usage), so its own CPU on the same 2 cores stays small;
  * per engine and concurrency: aggregate generated tokens/s (completion tokens of the wave / wall time of
    the wave) and p50/p95 time to first token (first content chunk);
  * side by side, the same engine in this process, no HTTP: concurrency 1 is `engine.stream()` one request
    at a time, 4 and 16 go through `slmops.serve.scheduler.Scheduler` (the server's batching) with that
    many requests in flight. At concurrency 1 server and in-process waves are interleaved (3 rounds, the
    order alternating each round; medians), since the machine is noisy;
  * soak: --soak-requests (2,000) requests at concurrency 16 against the demo student's server, 5% malformed
    (each must get a 4xx), the good ones streaming and not, small max_tokens: 5xx count, good requests
    answered, server RSS (with its engine worker process) after a warm-up (the first 10%, at most 200
    requests) and at the end.

Figures: `server_overhead_c1` = 1 - server tok/s / in-process tok/s at concurrency 1 (demo student; per
engine in `server_overhead_c1_by_engine`), `scaling_c16_over_c1` = server tok/s at 16 / at 1 (demo student).
Targets (issue #6): overhead <= 10%, scaling >= 2.5x, no 5xx in the soak, RSS growth < 5%.

Built models are cached under benchmarks/.cache/serve (--fresh rebuilds them). Writes
benchmarks/results/serve.json and serve.md. Usage:

    .venv/bin/python benchmarks/serve.py [--quick] [--soak-requests N] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import queue as queue_mod
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmops.bench.results import markdown_table, write_results  # noqa: E402
from slmops.demo.task import generate as demo_examples  # noqa: E402
from slmops.demo.teacher import BUNDLED_TEACHER_DIR  # noqa: E402
from slmops.serve.worker import default_threads  # noqa: E402

THREADS = 2
WAVE_CAP_S = 60.0  # a wave starts no new request after this long (a machine slowed down by other jobs)
PYTHON = sys.executable
CACHE = ROOT / "benchmarks" / ".cache" / "serve"
DISTILL_STUDENT = ROOT / "benchmarks" / ".work" / "distill" / "base" / "student-seq"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ models


def demo_student(cache: Path) -> Path:
    """The demo student as an HF folder: a copy of the distillation benchmark's sequence-level student when
    that benchmark has run, else the `demo-student` preset trained briefly on the demo task's labelled data."""
    out = cache / "student"
    if (out / "config.json").exists():
        return out
    if (DISTILL_STUDENT / "config.json").exists():
        shutil.copytree(DISTILL_STUDENT, out, ignore=shutil.ignore_patterns("checkpoints", "training.json"))
        (out / "SOURCE").write_text(f"copied from {DISTILL_STUDENT.relative_to(ROOT)}\n")
        return out
    from slmops.demo.task import DemoSizes, write_demo_data
    from slmops.distill.train import StudentTrainConfig, train_student

    log("no distilled student found (run benchmarks/distill.py for it): training the demo-student preset "
        "on demo data")
    data = write_demo_data(cache / "student-data", seed=0, sizes=DemoSizes(train=3000, val=0, test=0, prompts=0,
                                                                            gold=0))
    tmp = cache / "student-train"
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = StudentTrainConfig(student_preset="demo-student", tokenizer=str(BUNDLED_TEACHER_DIR), data=data["train"],
                             max_steps=800, batch_size=32, lr=2e-3, warmup_ratio=0.03,
                             val_fraction=0.02, max_length=256, seed=0, save_total_limit=1, logging_steps=50,
                             threads=THREADS, name="serve-student")
    train_student(cfg, tmp)
    shutil.copytree(tmp, out, ignore=shutil.ignore_patterns("checkpoints"))
    (out / "SOURCE").write_text("demo-student preset trained by benchmarks/serve.py on demo data\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def qwen_shape(cache: Path) -> Path:
    """benchmarks/export.py's Qwen2.5-0.5B-shaped preset, with the embedding rows past the demo tokenizer's
    vocabulary zeroed (so greedy decoding streams printable text; see its docs)."""
    from export import qwen_shape as build

    return build(cache, zero_unused_rows=True)


def qwen_exports(cache: Path) -> tuple[Path, Path]:
    """`qwen_shape` exported to int4 ONNX and q4_k_m GGUF. The 2 GB fp32 source is deleted once both exist."""
    onnx_dir, gguf = cache / "qwen0.5b-onnx-int4", cache / "qwen0.5b-q4_k_m.gguf"
    if (onnx_dir / "genai_config.json").exists() and gguf.exists():
        return onnx_dir, gguf
    log("building the Qwen2.5-0.5B-shaped preset (random weights)")
    src = qwen_shape(cache)
    if not (onnx_dir / "genai_config.json").exists():
        from slmops.export.onnx import export_onnx

        log("exporting int4 ONNX")
        export_onnx(str(src), onnx_dir, precision="int4", force=True, int4_block_size=128)
    if not gguf.exists():
        from slmops.export.gguf import export_gguf

        log("exporting q4_k_m GGUF")
        export_gguf(str(src), gguf, quant="q4_k_m", force=True, measure=False)
    shutil.rmtree(cache / "sources", ignore_errors=True)
    return onnx_dir, gguf


# ------------------------------------------------------------------------------------------ servers

LIVE_SERVERS: dict[int, str] = {}  # pid -> name, for CPU accounting and clean-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess (its own process group), ready when GET `ready_path` answers 200."""

    def __init__(self, argv: list[str], port: int, ready_path: str, log_file: Path, name: str,
                 env: dict[str, str] | None = None):
        self.port, self.name, self.log_file = port, name, log_file
        self.url = f"http://127.0.0.1:{port}"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_file.open("wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})})
        LIVE_SERVERS[self.proc.pid] = name
        try:
            self._wait_ready(ready_path)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, path: str, timeout: float = 600) -> None:
        import httpx2 as httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    self.start_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} server not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def rss_mb(self) -> float:
        """Resident memory of the server and its engine worker processes."""
        total = 0.0
        for pid in tree_pids(self.proc.pid):
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            total += next(int(x.split()[1]) for x in lines if x.startswith("VmRSS:")) / 1024
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        LIVE_SERVERS.pop(self.proc.pid, None)
        self._log.close()


def slmops_server(ref: Path, name: str, logs: Path, *extra: str, threads: int = THREADS,
                  tag: str = "") -> ServerProcess:
    port = free_port()
    argv = [PYTHON, "-m", "slmops", "-q", "serve", f"{ref}={name}", "--port", str(port), "--threads", str(threads),
            "--no-access-log", *extra]
    return ServerProcess(argv, port, "/ready", logs / f"slmops-{name}{tag}.log", f"slmops ({name}{tag})")


def llama_cpp_python_server(gguf: Path, name: str, logs: Path, n_ctx: int) -> ServerProcess:
    port = free_port()
    argv = [PYTHON, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name, "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS),
            "--n_ctx", str(n_ctx), "--n_batch", "512", "--verbose", "False",
            # its default cuts a running stream short when another request arrives: queue them instead, as
            # slmops's llama.cpp engine does (one sequence at a time)
            "--interrupt_requests", "False"]
    return ServerProcess(argv, port, "/v1/models", logs / f"llama-cpp-python-{name}.log", "llama-cpp-python")


# ------------------------------------------------------------------------------------------ CPU accounting

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int | str) -> list[int | str]:
    """`pid` and its live descendants (a server's engine worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return out


def proc_cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (all its threads) and of its child processes."""
    total = 0.0
    for p in tree_pids(pid) if pid != "self" else [pid]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (every core), from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK  # user nice system irq softirq steal


class CpuMeter:
    """CPU used during a wave by the measured side (a server process, or this process for in-process runs),
    by this process as the client, and by everything else on the machine (other jobs: noise), in cores."""

    def __init__(self, measured_pid: int | None):
        self.measured = measured_pid

    def __enter__(self) -> CpuMeter:
        self.pids = list(LIVE_SERVERS)
        self.t0, self.busy0, self.self0 = time.perf_counter(), machine_busy_s(), proc_cpu_s()
        self.srv0 = {p: proc_cpu_s(p) for p in self.pids}
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        me = proc_cpu_s() - self.self0
        srv = {p: proc_cpu_s(p) - v for p, v in self.srv0.items()}
        other = machine_busy_s() - self.busy0 - me - sum(srv.values())
        measured = srv.get(self.measured, 0.0) if self.measured is not None else me
        self.result = {"measured_cpu_s": measured, "client_cpu_s": me if self.measured is not None else None,
                       "other_load_cores": round(max(0.0, other / wall), 3) if wall > 0 else 0.0}


class NoiseGuard:
    """This machine is shared: before a wave, wait (a little) for other jobs' CPU load to drop; re-run a wave
    that other jobs disturbed (> `limit` cores of other load on average), keeping the least disturbed try.
    Waiting is capped by a total budget so the benchmark's wall time stays bounded."""

    def __init__(self, limit: float, retries: int, wait_budget_s: float, max_wave_s: float = 40.0):
        self.limit, self.retries, self.budget, self.max_wave_s = limit, retries, wait_budget_s, max_wave_s
        self.waited_s, self.reruns = 0.0, 0

    def wait_quiet(self, max_s: float = 15.0) -> None:
        t0 = time.perf_counter()
        while self.waited_s < self.budget and time.perf_counter() - t0 < max_s:
            with CpuMeter(None) as m:
                time.sleep(0.5)
            if m.result["other_load_cores"] < self.limit / 2:
                break
        self.waited_s += time.perf_counter() - t0

    def run(self, fn, pid: int | None) -> dict:
        tries = []
        for _ in range(self.retries + 1):
            self.wait_quiet()
            with CpuMeter(pid) as meter:
                res = fn()
            tokens = res["completion_tokens"] or 1
            m = meter.result
            res.update({"cpu_ms_per_token": 1000 * m["measured_cpu_s"] / tokens,
                        "client_cpu_ms_per_token": None if m["client_cpu_s"] is None
                        else 1000 * m["client_cpu_s"] / tokens,
                        "other_load_cores": m["other_load_cores"]})
            tries.append(res)
            if m["other_load_cores"] <= self.limit or self.waited_s >= self.budget or res["wall_s"] > self.max_wave_s:
                break  # undisturbed, out of waiting budget, or too long to repeat: keep it, flagged by its load
            self.reruns += 1
        best = min(tries, key=lambda r: r["other_load_cores"])
        best["tries"] = len(tries)
        if len(tries) > 1:
            best["discarded_tok_s"] = [round(r["tok_s"] or 0, 1) for r in tries if r is not best]
        return best


# ------------------------------------------------------------------------------------------ load generator


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: list[dict], wall: float, concurrency: int, truncated: bool = False) -> dict:
    """A wave's figures. `truncated`: the wave hit WAVE_CAP_S and stopped starting requests (a machine slowed
    down by other jobs); its figures cover the requests it finished."""
    ok = [r for r in results if r.get("ok")]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "completion_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": quantile(ttft, 0.5), "ttft_p95_s": quantile(ttft, 0.95), "ttfts": ttft, "truncated": truncated,
            **({"error_sample": next(r["error"] for r in results if not r.get("ok"))} if len(ok) < len(results)
               else {})}


class LeanHTTP:
    """A minimal asyncio HTTP/1.1 client (keep-alive connections, chunked or sized bodies) with the part of
    httpx's interface the waves use (`stream`, `post`). The waves measure the server against the engine with
    no HTTP at all, so the load generator's own cost (on the same 2 cores, in the same wall time) should be as
    small as it can be: httpx costs about 1-2 ms of Python per request on this machine. The soak, which checks
    behaviour rather than speed, uses httpx."""

    def __init__(self) -> None:
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def __aenter__(self) -> LeanHTTP:
        return self

    async def __aexit__(self, *exc) -> None:
        for _, w in self._idle:
            w.close()
        self._idle.clear()

    def stream(self, method: str, url: str, json: dict | None = None) -> _LeanResponse:
        return _LeanResponse(self, method, url, json)

    async def post(self, url: str, json: dict | None = None) -> _LeanResponse:
        r = _LeanResponse(self, "POST", url, json)
        await r.__aenter__()
        await r.aread()
        await r.__aexit__(None, None, None)
        return r


class _LeanResponse:
    def __init__(self, client: LeanHTTP, method: str, url: str, body: dict | None):
        from urllib.parse import urlsplit

        self.client, self.method, self.u, self.body = client, method, urlsplit(url), body
        self.status_code, self.headers, self.content = 0, {}, b""
        self._done = False

    async def __aenter__(self) -> _LeanResponse:
        data = json.dumps(self.body).encode() if self.body is not None else b""
        head = (f"{self.method} {self.u.path} HTTP/1.1\r\nHost: {self.u.netloc}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(data)}\r\nAccept: */*\r\n\r\n").encode()
        for fresh in (False, True):
            if self.client._idle and not fresh:
                self.r, self.w = self.client._idle.pop()
            else:
                self.r, self.w = await asyncio.open_connection(self.u.hostname, self.u.port)
            try:
                self.w.write(head + data)
                status = await self.r.readline()
                if not status:
                    raise ConnectionResetError("closed")
                break
            except (ConnectionError, OSError):
                self.w.close()
                if fresh:
                    raise
        self.status_code = int(status.split()[1])
        while (line := await self.r.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            self.headers[k.strip().lower()] = v.strip()
        return self

    async def _chunks(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.r.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.r.readline()
                    break
                chunk = await self.r.readexactly(size)
                await self.r.readexactly(2)
                yield chunk
        else:
            n = int(self.headers.get("content-length", "0"))
            if n:
                yield await self.r.readexactly(n)
        self._done = True

    async def aread(self) -> bytes:
        self.content = b"".join([c async for c in self._chunks()])
        return self.content

    async def aiter_lines(self):
        buf = b""
        async for chunk in self._chunks():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode()
        if buf:
            yield buf.decode()

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)

    async def __aexit__(self, *exc) -> None:
        if self._done and self.headers.get("connection", "").lower() != "close":
            self.client._idle.append((self.r, self.w))
        else:
            self.w.close()


async def _stream_chat(client, url: str, payload: dict) -> dict:
    """One streaming chat request: time to the first content chunk, completion tokens (the final usage chunk,
    else the number of content chunks). Only the events up to the first content and those with usage or an
    error are parsed as JSON, so the load generator's CPU (on the same 2 cores) stays small; `text` is the
    answer's first piece."""
    t0 = time.perf_counter()
    ttft, chunks, usage_tokens, text = None, 0, None, []
    async with client.stream("POST", url + "/v1/chat/completions", json=payload) as r:
        if r.status_code != 200:
            body = (await r.aread())[:300]
            return {"ok": False, "status": r.status_code, "error": f"HTTP {r.status_code}: {body!r}"}
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            if ttft is not None and '"usage"' not in data and '"error"' not in data:
                if '"content"' in data and '"role"' not in data:
                    chunks += 1
                continue
            obj = json.loads(data)
            if "error" in obj:
                return {"ok": False, "status": 200, "error": f"in-band error: {obj['error']}"}
            if obj.get("usage"):
                usage_tokens = obj["usage"].get("completion_tokens")
            for ch in obj.get("choices") or ():
                delta = ch.get("delta") or {}
                content = delta.get("content")
                if content is not None and "role" not in delta:
                    chunks += 1  # llama-cpp-python: one chunk per generated token, some empty (partial UTF-8)
                if content:
                    text.append(content)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    if not done:
        return {"ok": False, "status": 200, "error": "stream ended without [DONE]"}
    return {"ok": True, "status": 200, "ttft": ttft, "tokens": usage_tokens if usage_tokens is not None else chunks,
            "text": "".join(text)}


async def _plain_chat(client, url: str, payload: dict) -> dict:
    r = await client.post(url + "/v1/chat/completions", json=payload)
    if r.status_code != 200:
        return {"ok": False, "status": r.status_code, "error": f"HTTP {r.status_code}: {r.text[:300]!r}"}
    body = r.json()
    return {"ok": True, "status": 200, "ttft": None, "tokens": body["usage"]["completion_tokens"],
            "text": body["choices"][0]["message"]["content"]}


async def _http_wave(url: str, model: str, prompts: list[list[dict]], concurrency: int, n: int,
                     max_tokens: int, stream: bool, extra: dict | None = None) -> dict:
    async with LeanHTTP() as client:
        todo = iter(range(n))
        results: list[dict] = []

        async def worker() -> None:
            for i in todo:
                if time.perf_counter() > deadline:
                    truncated.append(i)
                    continue
                payload = {"model": model, "messages": prompts[i % len(prompts)], "max_tokens": max_tokens,
                           "temperature": 0, **(extra or {})}
                try:
                    if stream:
                        payload.update(stream=True, stream_options={"include_usage": True})
                        results.append(await _stream_chat(client, url, payload))
                    else:
                        results.append(await _plain_chat(client, url, payload))
                except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                    results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

        truncated: list[int] = []
        t0 = time.perf_counter()
        deadline = t0 + WAVE_CAP_S
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(results, wall, concurrency, truncated=bool(truncated))


def http_wave(server: ServerProcess, model: str, prompts, concurrency: int, n: int, max_tokens: int,
              stream: bool = True, extra: dict | None = None) -> dict:
    return run_async(_http_wave(server.url, model, prompts, concurrency, n, max_tokens, stream, extra))


def run_async(coro):
    """Run the load generator on uvloop when it is installed (less client overhead per request), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def inproc_wave(engine, prompts, concurrency: int, n: int, max_tokens: int, scheduler: bool | None = None) -> dict:
    """The engine with no HTTP: `engine.stream` one request at a time at concurrency 1, else the server's
    Scheduler (the batch size and queue of `slmops serve`'s defaults) with `concurrency` requests in flight
    (`scheduler=True` uses it at concurrency 1 too)."""
    from slmops.engines import GenerationRequest

    def request(i: int) -> GenerationRequest:
        return GenerationRequest(messages=prompts[i % len(prompts)], max_new_tokens=max_tokens, temperature=0.0)

    results: list[dict] = []
    total = n
    if not (scheduler if scheduler is not None else concurrency > 1):
        t0 = time.perf_counter()
        for i in range(n):
            if time.perf_counter() - t0 > WAVE_CAP_S:
                return summarize(results, time.perf_counter() - t0, concurrency, truncated=True)
            ts = time.perf_counter()
            ttft, tokens = None, 0
            for ev in engine.stream(request(i)):
                if ttft is None and ev.text:
                    ttft = time.perf_counter() - ts
                tokens = ev.completion_tokens
            results.append({"ok": True, "ttft": ttft, "tokens": tokens})
        return summarize(results, time.perf_counter() - t0, concurrency)

    from slmops.serve.scheduler import Scheduler

    sched = Scheduler(engine, max_batch_size=16, max_queue=64, name="in-process")
    events: queue_mod.Queue = queue_mod.Queue()
    state: dict[int, dict] = {}
    try:
        def submit(i: int) -> None:
            state[i] = {"t0": time.perf_counter(), "ttft": None, "tokens": 0}
            sched.submit(request(i), lambda item, i=i: events.put((i, item, time.perf_counter())))

        t0 = time.perf_counter()
        nxt = 0
        while nxt < min(concurrency, n):
            submit(nxt)
            nxt += 1
        done = 0
        while done < n:
            i, item, t = events.get(timeout=600)
            s = state[i]
            if isinstance(item, BaseException):
                results.append({"ok": False, "error": f"{type(item).__name__}: {item}"})
            elif item is not None:
                if s["ttft"] is None and item.text:
                    s["ttft"] = t - s["t0"]
                s["tokens"] = item.completion_tokens
                continue
            else:
                results.append({"ok": True, "ttft": s["ttft"], "tokens": s["tokens"]})
            done += 1
            if nxt < n and time.perf_counter() - t0 > WAVE_CAP_S:
                n = nxt  # stop starting requests; finish those in flight
            if nxt < n:
                submit(nxt)
                nxt += 1
        wall = time.perf_counter() - t0
    finally:
        sched.close()
    return summarize(results, wall, concurrency, truncated=n < total)


# ------------------------------------------------------------------------------------------ measurement


class Arm:
    """One way of serving the engine: `run(concurrency, n)` -> wave result; `pid` is the server process whose CPU
    is the measured side (None: this process, in-process runs); `levels` the concurrencies it runs at;
    diagnostic arms go to `diagnostics`, not to the results rows."""

    def __init__(self, server: str, run, pid: int | None = None, levels: tuple[int, ...] = (1, 4, 16),
                 diagnostic: bool = False):
        self.server, self.run, self.pid, self.levels, self.diagnostic = server, run, pid, levels, diagnostic


def measure_engine(spec: dict, arms: list[Arm], rounds: int, guard: NoiseGuard) -> list[dict]:
    """Rows for one engine. Concurrency 1: `rounds` interleaved rounds over every arm (the order reversed every
    other round): median tok/s, TTFT percentiles over every request of the rounds. Higher concurrency: one wave
    per arm. Every wave is watched by `guard`."""

    def wave(arm: Arm, c: int, n: int) -> dict:
        return guard.run(lambda: arm.run(c, n), arm.pid)

    def show(arm: Arm, c: int, res: dict, label: str) -> None:
        log(f"  {label:<10s} {arm.server:27s} {res['tok_s'] or 0:8.1f} tok/s  ttft p50 "
            f"{_fmt(res['ttft_p50_s'], '.4f')} p95 {_fmt(res['ttft_p95_s'], '.4f')} s  "
            f"cpu {res['cpu_ms_per_token']:.2f} ms/tok  other load {res['other_load_cores']:.2f}"
            + (f" (tries {res['tries']})" if res.get("tries", 1) > 1 else "")
            + (f" TRUNCATED at {WAVE_CAP_S:.0f} s: {res['requests']} requests" if res.get("truncated") else "")
            + (f"  ERRORS {res['errors']}: {res.get('error_sample')}" if res["errors"] else ""))

    for arm in arms:  # warm-up: first-call costs, connection set-up
        arm.run(1, 2)
    rows = []
    base = {"engine": spec["engine"], "model": spec["model"], "max_tokens": spec["max_tokens"]}
    first = [a for a in arms if 1 in a.levels]
    per_round: dict[str, list[dict]] = {a.server: [] for a in first}
    for r in range(rounds):
        for arm in (first if r % 2 == 0 else first[::-1]):
            res = wave(arm, 1, spec["requests"][1])
            per_round[arm.server].append(res)
            show(arm, 1, res, f"c=1 r{r + 1}")
    for arm in first:
        waves = per_round[arm.server]
        ttfts = [t for w in waves for t in w["ttfts"]]  # every request of every round
        rows.append({**base, "server": arm.server, "concurrency": 1, "diagnostic": arm.diagnostic,
                     "tok_s": statistics.median(w["tok_s"] for w in waves),
                     "tok_s_rounds": [round(w["tok_s"], 2) for w in waves],
                     "ttft_p50_s": quantile(ttfts, 0.5), "ttft_p95_s": quantile(ttfts, 0.95),
                     "requests": sum(w["requests"] for w in waves), "errors": sum(w["errors"] for w in waves),
                     "completion_tokens": sum(w["completion_tokens"] for w in waves), "rounds": rounds,
                     "cpu_ms_per_token": statistics.median(w["cpu_ms_per_token"] for w in waves),
                     "client_cpu_ms_per_token": None if waves[0]["client_cpu_ms_per_token"] is None
                     else statistics.median(w["client_cpu_ms_per_token"] for w in waves),
                     "other_load_cores": max(w["other_load_cores"] for w in waves),
                     "tries": sum(w["tries"] for w in waves), "truncated": any(w["truncated"] for w in waves)})
    for c in sorted({c for a in arms for c in a.levels} - {1}):
        for arm in arms:
            if c in arm.levels:
                res = wave(arm, c, spec["requests"][c])
                show(arm, c, res, f"c={c}")
                rows.append({**base, "server": arm.server, "diagnostic": arm.diagnostic, **res, "rounds": 1})
    inproc = {r["concurrency"]: r["tok_s"] for r in rows if r["server"] == "in-process"}
    for r in rows:
        if r["server"] != "in-process" and inproc.get(r["concurrency"]):
            r["overhead_vs_in_process"] = 1 - r["tok_s"] / inproc[r["concurrency"]]
        for k in ("ttfts", "wall_s"):
            r.pop(k, None)
    return rows


# ------------------------------------------------------------------------------------------ soak


MALFORMED = ("invalid_json", "negative_max_tokens", "empty_messages", "unknown_model", "wrong_role_order",
             "body_too_large", "bad_temperature_type", "missing_messages")


def malformed_request(kind: str, model: str, prompt: list[dict], max_body: int) -> tuple[bytes, int]:
    """(body, the status it must get)."""
    base = {"model": model, "messages": prompt, "max_tokens": 8}
    if kind == "invalid_json":
        return b'{"model": "' + model.encode() + b'", "messages": [', 400
    if kind == "negative_max_tokens":
        return json.dumps({**base, "max_tokens": -5}).encode(), 400
    if kind == "empty_messages":
        return json.dumps({**base, "messages": []}).encode(), 400
    if kind == "unknown_model":
        return json.dumps({**base, "model": "no-such-model"}).encode(), 404
    if kind == "wrong_role_order":
        return json.dumps({**base, "messages": [{"role": "assistant", "content": "hi"}, *prompt,
                                                {"role": "assistant", "content": "prefill"}]}).encode(), 400
    if kind == "body_too_large":
        return json.dumps({**base, "messages": [{"role": "user", "content": "x" * (max_body + 10)}]}).encode(), 413
    if kind == "bad_temperature_type":
        return json.dumps({**base, "temperature": "hot"}).encode(), 400
    if kind == "missing_messages":
        return json.dumps({"model": model, "max_tokens": 8}).encode(), 400
    raise ValueError(kind)


async def _soak(server: ServerProcess, model: str, prompts, total: int, warmup: int, concurrency: int,
                max_body: int) -> dict:
    import httpx2 as httpx

    stats: dict[str, Any] = {"good": 0, "good_ok": 0, "good_failed": 0, "malformed": 0, "malformed_4xx": 0,
                             "malformed_expected_status": 0, "5xx": 0, "429": 0, "status_counts": {},
                             "malformed_by_kind": {}, "failures": []}
    rss_trace: list[tuple[int, float]] = []
    every = max(1, round(1 / 0.05))  # 5% malformed

    def note_status(status: int) -> None:
        stats["status_counts"][str(status)] = stats["status_counts"].get(str(status), 0) + 1
        if status >= 500:
            stats["5xx"] += 1
        if status == 429:
            stats["429"] += 1

    async def one(client, i: int) -> None:
        prompt = prompts[i % len(prompts)]
        if i % every == every - 1:
            kind = MALFORMED[(i // every) % len(MALFORMED)]
            body, want = malformed_request(kind, model, prompt, max_body)
            stats["malformed"] += 1
            k = stats["malformed_by_kind"].setdefault(kind, {"sent": 0, "statuses": {}})
            k["sent"] += 1
            try:
                r = await client.post(server.url + "/v1/chat/completions", content=body,
                                      headers={"content-type": "application/json"})
                status = r.status_code
                shaped = isinstance(r.json().get("error"), dict)
            except Exception as exc:  # noqa: BLE001
                stats["failures"].append(f"malformed {kind}: {type(exc).__name__}: {exc}")
                return
            note_status(status)
            k["statuses"][str(status)] = k["statuses"].get(str(status), 0) + 1
            if 400 <= status < 500 and shaped:
                stats["malformed_4xx"] += 1
            if status == want:
                stats["malformed_expected_status"] += 1
            return
        stats["good"] += 1
        max_tokens = 8 + i % 9  # 8..16
        payload = {"model": model, "messages": prompt, "max_tokens": max_tokens, "temperature": 0}
        try:
            if i % 2:
                res = await _stream_chat(client, server.url, {**payload, "stream": True})
                status, ok = res.get("status", 0), res.get("ok") and bool(res.get("text"))
                err = res.get("error")
            else:
                r = await client.post(server.url + "/v1/chat/completions", json=payload)
                status = r.status_code
                body = r.json()
                ok = status == 200 and bool(body["choices"][0]["message"]["content"]) \
                    and body["usage"]["completion_tokens"] > 0
                err = None if ok else f"HTTP {status}: {str(body)[:200]}"
        except Exception as exc:  # noqa: BLE001
            status, ok, err = 0, False, f"{type(exc).__name__}: {exc}"
        if status:
            note_status(status)
        if ok:
            stats["good_ok"] += 1
        else:
            stats["good_failed"] += 1
            if len(stats["failures"]) < 20:
                stats["failures"].append(err or "empty content")

    async def phase(client, start: int, end: int) -> None:
        todo = iter(range(start, end))

        async def worker() -> None:
            for i in todo:
                await one(client, i)
                if (i + 1) % 200 == 0:
                    rss_trace.append((i + 1, round(server.rss_mb(), 1)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        rss_start = server.rss_mb()
        t0 = time.perf_counter()
        await phase(client, 0, warmup)
        await asyncio.sleep(0.5)
        rss_warm = server.rss_mb()
        await phase(client, warmup, total)
        wall = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        rss_end = server.rss_mb()
    return {"requests": total, "concurrency": concurrency, "warmup_requests": warmup, **stats,
            "every_good_answered": stats["good_failed"] == 0 and stats["good_ok"] == stats["good"],
            "rss_mb_start": round(rss_start, 1), "rss_mb_after_warmup": round(rss_warm, 1),
            "rss_mb_end": round(rss_end, 1), "rss_growth": (rss_end - rss_warm) / rss_warm,
            "rss_trace_mb": rss_trace, "wall_s": round(wall, 1), "req_per_s": round(total / wall, 1)}


def soak(student: Path, logs: Path, prompts, total: int, max_body: int = 65536) -> dict:
    server = slmops_server(student, "demo-student", logs, "--max-body", str(max_body))
    try:
        warmup = min(200, max(1, total // 10))
        res = asyncio.run(_soak(server, "demo-student", prompts, total, warmup, 16, max_body))
        res["server_alive_after"] = server.proc.poll() is None
        res["max_body_bytes"] = max_body
        return res
    finally:
        server.stop()


def run_engine(spec: dict, prompts, logs: Path, guard: NoiseGuard, quick: bool) -> tuple[list[dict], dict]:
    """Start the engine's server(s) and open it in-process, measure every arm; (rows, server start-up seconds)."""
    import torch

    from slmops.engines import open_engine

    log(f"{spec['engine']}: {spec['model']} ({spec['ref'].relative_to(ROOT)})")
    servers: list[ServerProcess] = []
    engine = None
    name, mt = spec["served_name"], spec["max_tokens"]

    def via_http(srv: ServerProcess, stream: bool = True, extra: dict | None = None):
        return lambda c, n: http_wave(srv, name, prompts, c, n, mt, stream, extra)

    threads = spec["threads"]

    def inproc(scheduler: bool | None = None, n_threads: int = threads):
        def run(c: int, n: int) -> dict:
            torch.set_num_threads(n_threads)
            try:
                return inproc_wave(engine, prompts, c, n, mt, scheduler)
            finally:
                torch.set_num_threads(threads)
        return run

    try:
        servers.append(slmops_server(spec["ref"], name, logs, threads=threads))
        main_srv = servers[-1]
        engine = open_engine(str(spec["ref"]), threads=threads)
        arms = [Arm("slmops", via_http(main_srv), main_srv.proc.pid), Arm("in-process", inproc())]
        if spec["key"] == "llama.cpp":
            servers.append(llama_cpp_python_server(spec["ref"], name, logs, engine.n_ctx))
            # its sampling defaults include repeat_penalty 1.1 (and top_k 40): plain greedy like the others
            arms.append(Arm("llama-cpp-python", via_http(servers[-1], extra={"repeat_penalty": 1.0, "top_k": 0}),
                            servers[-1].proc.pid))
        if spec["key"] == "torch" and not quick:
            # what the server's cost at concurrency 1 is made of: the scheduler's decode path without HTTP,
            # HTTP without per-token SSE; and the settings the defaults avoid: 2 torch threads (the engine's
            # threads then take both cores from the event loop and the client), the engine on a thread of the
            # server process (one GIL for decoding and HTTP)
            servers.append(slmops_server(spec["ref"], name, logs, threads=THREADS, tag="-2threads"))
            two = servers[-1]
            servers.append(slmops_server(spec["ref"], name, logs, "--isolation", "thread", threads=threads,
                                         tag="-thread"))
            threaded = servers[-1]
            arms += [Arm("in-process (Scheduler)", inproc(scheduler=True), levels=(1,), diagnostic=True),
                     Arm("slmops (--isolation thread)", via_http(threaded), threaded.proc.pid, levels=(1, 16),
                         diagnostic=True),
                     Arm("slmops (non-streaming)", via_http(main_srv, stream=False), main_srv.proc.pid,
                         levels=(1, 16), diagnostic=True),
                     Arm(f"slmops (--threads {THREADS})", via_http(two), two.proc.pid, levels=(1, 16),
                         diagnostic=True),
                     Arm(f"in-process ({THREADS} threads)", inproc(n_threads=THREADS), levels=(1, 16),
                         diagnostic=True)]
        started = {srv.name: round(srv.start_s, 1) for srv in servers}
        rows = measure_engine(spec, arms, rounds=spec["rounds"], guard=guard)
        for r in rows:
            arm = next((a for a in arms if a.server == r["server"]), None)
            if arm is not None and arm.pid:
                r["server_rss_mb"] = round(next(x for x in servers if x.proc.pid == arm.pid).rss_mb(), 1)
        return rows, started
    finally:
        for srv in servers:
            srv.stop()
        if engine is not None:
            engine.close()
        gc.collect()


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer requests and rounds, short soak")
    ap.add_argument("--soak-requests", type=int, default=None, help="soak size (default: 2000; 200 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds at concurrency 1 (default: 3)")
    ap.add_argument("--engines", default="torch,ort-genai,llama.cpp",
                    help="comma list of torch, ort-genai, llama.cpp (llama.cpp includes llama-cpp-python's server)")
    ap.add_argument("--no-soak", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="rebuild the cached models")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    quick = args.quick
    soak_requests = args.soak_requests if args.soak_requests is not None else (200 if quick else 2000)
    rounds = args.rounds or (1 if quick else 3)
    levels = [1, 4, 16]
    t_all = time.perf_counter()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    if args.fresh:
        shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    logs = CACHE / "logs"

    import torch

    torch.set_num_threads(THREADS)
    prompts = [[{"role": "user", "content": ex.message}] for ex in demo_examples(64, seed=7)]
    wanted = set(args.engines.split(","))
    student = demo_student(CACHE)
    specs = []
    if "torch" in wanted:
        specs.append({"key": "torch", "engine": "torch", "model": "demo-student", "served_name": "demo-student",
                      "ref": student, "max_tokens": 48, "rounds": rounds, "threads": default_threads(),
                      "requests": {1: 8, 4: 16, 16: 32} if quick else {1: 16, 4: 32, 16: 64}})
    if wanted & {"ort-genai", "llama.cpp"}:
        onnx_dir, gguf = qwen_exports(CACHE)
        small = {1: 2, 4: 4, 16: 16} if quick else {1: 4, 4: 8, 16: 16}
        if "ort-genai" in wanted:
            specs.append({"key": "ort-genai", "engine": "ort-genai", "model": "qwen2.5-0.5b-shape int4 (ONNX)",
                          "served_name": "qwen-int4", "ref": onnx_dir, "max_tokens": 32, "requests": small,
                          "threads": THREADS,
                          "rounds": rounds})
        if "llama.cpp" in wanted:
            specs.append({"key": "llama.cpp", "engine": "llama.cpp", "model": "qwen2.5-0.5b-shape q4_k_m (GGUF)",
                          "served_name": "qwen-q4km", "ref": gguf, "max_tokens": 32, "requests": small,
                          "threads": THREADS,
                          "rounds": rounds})

    global WAVE_CAP_S
    WAVE_CAP_S = 30.0 if quick else 60.0
    guard = NoiseGuard(limit=0.3, retries=0 if quick else 2, wait_budget_s=10 if quick else 120)
    rows: list[dict] = []
    servers_info: dict[str, float] = {}
    errors = {}
    for spec in specs:
        try:
            engine_rows, started = run_engine(spec, prompts, logs, guard, quick)
        except Exception as exc:  # noqa: BLE001 - a failed engine is reported, the others still run
            log(f"  {spec['engine']} FAILED: {type(exc).__name__}: {exc}")
            errors[spec["engine"]] = f"{type(exc).__name__}: {exc}"
            continue
        rows.extend(engine_rows)
        servers_info.update(started)
    diagnostics = [r for r in rows if r.pop("diagnostic")]
    rows = [r for r in rows if r not in diagnostics]

    def row(engine: str, server: str, c: int) -> dict:
        return next((r for r in rows if (r["engine"], r["server"], r["concurrency"]) == (engine, server, c)), {})

    by_engine = {}
    for spec in specs:
        r = row(spec["engine"], "slmops", 1)
        if "overhead_vs_in_process" in r:
            by_engine[spec["engine"]] = r["overhead_vs_in_process"]
    lcp = row("llama.cpp", "llama-cpp-python", 1)
    if "overhead_vs_in_process" in lcp:
        by_engine["llama-cpp-python server (vs slmops's in-process llama.cpp engine)"] = lcp["overhead_vs_in_process"]
    overhead = by_engine.get("torch")
    s1, s16 = row("torch", "slmops", 1).get("tok_s"), row("torch", "slmops", 16).get("tok_s")
    scaling = s16 / s1 if s1 and s16 else None
    i1, i16 = row("torch", "in-process", 1).get("tok_s"), row("torch", "in-process", 16).get("tok_s")
    sched1 = next((r["tok_s"] for r in diagnostics if r["server"] == "in-process (Scheduler)"), None)
    decomposition = {
        # the same split of the demo student's concurrency-1 overhead: the scheduler's decode path (a worker
        # thread handing every token to another thread) without HTTP, then HTTP + server-sent events on top
        "scheduler_path_vs_engine_stream": 1 - sched1 / i1 if sched1 and i1 else None,
        "server_vs_in_process_scheduler": 1 - s1 / sched1 if sched1 and s1 else None,
    } if sched1 else None

    soak_res = None
    if not args.no_soak and soak_requests > 0:
        log(f"soak: {soak_requests} requests at concurrency 16 against the demo student")
        soak_res = soak(student, logs, prompts, soak_requests)
        log(f"  5xx {soak_res['5xx']}, good {soak_res['good_ok']}/{soak_res['good']} answered, malformed 4xx "
            f"{soak_res['malformed_4xx']}/{soak_res['malformed']}, RSS {soak_res['rss_mb_after_warmup']} -> "
            f"{soak_res['rss_mb_end']} MB ({soak_res['rss_growth']:+.2%}), {soak_res['req_per_s']} req/s")

    targets = {}
    if overhead is not None:
        targets["server_overhead_c1<=0.10 (demo student)"] = overhead <= 0.10
    if scaling is not None:
        targets["scaling_c16_over_c1>=2.5 (demo student)"] = scaling >= 2.5
    if soak_res:
        targets["soak: no 5xx"] = soak_res["5xx"] == 0
        targets["soak: every good request answered"] = soak_res["every_good_answered"]
        targets["soak: every malformed request got a 4xx"] = soak_res["malformed_4xx"] == soak_res["malformed"]
        targets["soak: rss_growth<0.05"] = soak_res["rss_growth"] < 0.05
    payload = {
        "benchmark": "serve", "quick": quick,
        "server_overhead_c1": overhead, "server_overhead_c1_by_engine": by_engine,
        "scaling_c16_over_c1": scaling,
        "scaling_c16_over_c1_in_process": i16 / i1 if i1 and i16 else None,
        "server_overhead_c1_decomposition": decomposition,
        "targets": targets, "rows": rows, "diagnostics": diagnostics, "soak": soak_res, "engine_errors": errors,
        "settings": {"threads": {s["engine"]: s["threads"] for s in specs}, "rounds_c1": rounds, "levels": levels,
                     "requests": {s["engine"]: s["requests"] for s in specs},
                     "max_tokens": {s["engine"]: s["max_tokens"] for s in specs},
                     "client": "httpx2 AsyncClient, streaming chat requests, stream_options.include_usage",
                     "server_max_batch_size": 16, "server_max_queue": 64},
        "models": {s["engine"]: str(s["ref"].relative_to(ROOT)) for s in specs},
        "student_source": (student / "SOURCE").read_text().strip() if (student / "SOURCE").exists() else None,
        "server_start_s": servers_info,
        "noise_guard": {"other_load_limit_cores": guard.limit, "max_reruns_per_wave": guard.retries,
                        "reruns": guard.reruns, "waited_for_quiet_s": round(guard.waited_s, 1)},
        "loadavg_start": load_start, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    for k, v in targets.items():
        log(f"target {k}: {'MET' if v else 'NOT MET'}")
    log(f"server_overhead_c1 = {overhead}, scaling_c16_over_c1 = {scaling}")
    write_md_and_json(payload, args.out)


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def write_md_and_json(payload: dict, out: Path) -> None:
    rows = payload["rows"]
    cols = ["engine", "model", "server", "concurrency", "requests", "tok_s", "ttft_p50_s", "ttft_p95_s",
            "overhead_vs_in_process", "cpu_ms_per_token", "client_cpu_ms_per_token", "other_load_cores", "tries",
            "truncated", "errors"]
    s = payload["settings"]
    g = payload["noise_guard"]
    md = (f"Streaming chat requests (temperature 0, fixed max_tokens: {s['max_tokens']}) from an asyncio client in "
          f"another process; threads per engine (the server's and the in-process engine alike): {s['threads']} (the "
          "torch engine: `slmops serve`'s default for an engine in a worker process, all cores but one). tok_s = completion tokens of the wave / its "
          f"wall time; TTFT = time to the first content chunk. Concurrency 1: {s['rounds_c1']} interleaved rounds "
          "(medians); in-process = the same engine with no HTTP (`engine.stream` at 1, the server's Scheduler at "
          "4 and 16). cpu_ms_per_token: CPU of the measured side (the server process, or the engine in-process) "
          "per generated token; client_cpu_ms_per_token: the load generator's. other_load_cores: CPU used by "
          "other jobs on this shared machine during the wave (the worst round at concurrency 1); waves with "
          f"more than {g['other_load_limit_cores']} cores of it were re-run up to {g['max_reruns_per_wave']} times "
          f"(`tries`; {g['reruns']} re-runs in all, {g['waited_for_quiet_s']} s spent waiting for a quiet "
          "machine).\n\n" + markdown_table(rows, cols) + "\n")
    if payload.get("diagnostics"):
        md += ("\n## Diagnostics (demo student): where the server's time goes\n\n"
               "in-process (Scheduler): the server's decode path (continuous batching) without HTTP; slmops "
               "(non-streaming): HTTP without per-token server-sent events; slmops (--isolation thread): the engine "
               "on a thread of the server process instead of a worker process; slmops (--threads N) and "
               "in-process (N threads): more torch threads. Interleaved with the rows above at concurrency 1.\n\n"
               + markdown_table(payload["diagnostics"], cols) + "\n")
    by = payload["server_overhead_c1_by_engine"]
    md += ("## Headline figures\n\n"
           f"- server_overhead_c1 (demo student, torch): **{_fmt(payload['server_overhead_c1'], '.1%')}** "
           "(target <= 10%)\n"
           f"- scaling_c16_over_c1 (demo student through the server): **{_fmt(payload['scaling_c16_over_c1'], '.2f')}x**"
           f" (target >= 2.5x; in-process {_fmt(payload['scaling_c16_over_c1_in_process'], '.2f')}x)\n"
           "- server overhead at concurrency 1 by engine: "
           + ", ".join(f"{k}: {_fmt(v, '.1%')}" for k, v in by.items()) + "\n")
    dec = payload.get("server_overhead_c1_decomposition")
    if dec:
        md += ("- the demo student's concurrency-1 overhead split: the scheduler's decode path vs `engine.stream`, "
               f"both in-process: {_fmt(dec['scheduler_path_vs_engine_stream'], '.1%')}; the server (HTTP + SSE) vs "
               f"that in-process Scheduler: {_fmt(dec['server_vs_in_process_scheduler'], '.1%')}\n")
    soak_res = payload.get("soak")
    if soak_res:
        md += ("\n## Soak\n\n"
               f"{soak_res['requests']} requests at concurrency {soak_res['concurrency']} against the demo student "
               f"(5% malformed, rotating {', '.join(MALFORMED)}; good ones streaming and not, max_tokens 8-16; "
               f"--max-body {soak_res['max_body_bytes']}):\n\n"
               f"| 5xx | good answered | malformed -> 4xx | malformed -> expected status | 429 | RSS after "
               f"warm-up MB | RSS end MB | rss_growth | req/s |\n|---|---|---|---|---|---|---|---|---|\n"
               f"| {soak_res['5xx']} | {soak_res['good_ok']}/{soak_res['good']} | {soak_res['malformed_4xx']}/"
               f"{soak_res['malformed']} | {soak_res['malformed_expected_status']}/{soak_res['malformed']} | "
               f"{soak_res['429']} | {soak_res['rss_mb_after_warmup']} | {soak_res['rss_mb_end']} | "
               f"{soak_res['rss_growth']:+.2%} | {soak_res['req_per_s']} |\n\n"
               f"RSS trace (requests, MB): {soak_res['rss_trace_mb']}\n")
    md += ("\nTargets: " + json.dumps(payload["targets"], indent=1) + f"\n\nWall time: {payload['wall_s']:.0f} s; "
           f"load average at start {' '.join(payload['loadavg_start'])}, at end {' '.join(payload['loadavg_end'])}\n")
    jpath, mpath = write_results("serve", payload, md, out)
    log(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
