"""Serving benchmark: the OpenAI-compatible server against the same engine called in-process, and against
llama-cpp-python's own server, at concurrency 1, 4 and 16; then a soak with malformed requests.

One run, on this machine (every engine with 2 threads):
  * engines: the demo student (torch engine, HF folder: the distillation benchmark's student when it exists,
    else a quickly trained one), the Qwen2.5-0.5B-shaped preset with random weights exported to int4 ONNX
    (ort-genai engine) and to q4_k_m GGUF (llama.cpp engine); the same GGUF also served by llama-cpp-python's
    own OpenAI server (`python -m llama_cpp.server`);
  * every server is a subprocess (the load generator never shares its GIL); the load generator is an asyncio
    client (httpx2) sending streaming chat requests with fixed demo-task prompts, temperature 0 and a fixed
    max_tokens, keeping `concurrency` requests in flight;
  * per engine and concurrency: aggregate generated tokens/s (completion tokens of the wave / wall time of
    the wave) and p50/p95 time to first token (first content chunk);
  * side by side, the same engine in this process, no HTTP: concurrency 1 is `engine.stream()` one request
    at a time, 4 and 16 go through `slmops.serve.scheduler.Scheduler` (the server's batching) with that
    many requests in flight. At concurrency 1 server and in-process waves are interleaved (3 rounds, the
    order alternating each round; medians), since the machine is noisy;
  * soak: --soak-requests (2,000) requests at concurrency 16 against the demo student's server, 5% malformed
    (each must get a 4xx), the good ones streaming and not, small max_tokens: 5xx count, good requests
    answered, server RSS after a warm-up (the first 10%, at most 200 requests) and at the end.

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
import importlib.util
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

THREADS = 2
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


def qwen_exports(cache: Path) -> tuple[Path, Path]:
    """The Qwen2.5-0.5B-shaped preset (random weights, demo tokenizer; built as benchmarks/export.py does)
    exported to int4 ONNX and q4_k_m GGUF. The 2 GB fp32 source is deleted once both exports exist."""
    onnx_dir, gguf = cache / "qwen0.5b-onnx-int4", cache / "qwen0.5b-q4_k_m.gguf"
    if (onnx_dir / "genai_config.json").exists() and gguf.exists():
        return onnx_dir, gguf
    spec = importlib.util.spec_from_file_location("export_benchmark", ROOT / "benchmarks" / "export.py")
    export_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_bench)
    log("building the Qwen2.5-0.5B-shaped preset (random weights)")
    src = export_bench.qwen_shape(cache)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess (its own process group), ready when GET `ready_path` answers 200."""

    def __init__(self, argv: list[str], port: int, ready_path: str, log_file: Path, name: str):
        self.port, self.name, self.log_file = port, name, log_file
        self.url = f"http://127.0.0.1:{port}"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_file.open("wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
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
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

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
        self._log.close()


def slmops_server(ref: Path, name: str, logs: Path, *extra: str) -> ServerProcess:
    port = free_port()
    argv = [PYTHON, "-m", "slmops", "-q", "serve", f"{ref}={name}", "--port", str(port), "--threads", str(THREADS),
            "--no-access-log", *extra]
    return ServerProcess(argv, port, "/ready", logs / f"slmops-{name}.log", f"slmops ({name})")


def llama_cpp_python_server(gguf: Path, name: str, logs: Path, n_ctx: int) -> ServerProcess:
    port = free_port()
    argv = [PYTHON, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name, "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS),
            "--n_ctx", str(n_ctx), "--n_batch", "512", "--verbose", "False"]
    return ServerProcess(argv, port, "/v1/models", logs / f"llama-cpp-python-{name}.log", "llama-cpp-python")


# ------------------------------------------------------------------------------------------ load generator


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: list[dict], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r.get("ok")]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "completion_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": quantile(ttft, 0.5), "ttft_p95_s": quantile(ttft, 0.95), "ttfts": ttft,
            **({"error_sample": next(r["error"] for r in results if not r.get("ok"))} if len(ok) < len(results)
               else {})}


async def _stream_chat(client, url: str, payload: dict) -> dict:
    """One streaming chat request: time to the first content chunk, completion tokens (the final usage chunk,
    else the number of content chunks)."""
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
            obj = json.loads(data)
            if "error" in obj:
                return {"ok": False, "status": 200, "error": f"in-band error: {obj['error']}"}
            if obj.get("usage"):
                usage_tokens = obj["usage"].get("completion_tokens")
            for ch in obj.get("choices") or ():
                content = (ch.get("delta") or {}).get("content")
                if content:
                    chunks += 1
                    text.append(content)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    if not done:
        return {"ok": False, "status": 200, "error": "stream ended without [DONE]"}
    return {"ok": True, "status": 200, "ttft": ttft, "tokens": usage_tokens if usage_tokens is not None else chunks,
            "text": "".join(text), "latency": time.perf_counter() - t0}


async def _http_wave(url: str, model: str, prompts: list[list[dict]], concurrency: int, n: int,
                     max_tokens: int) -> dict:
    import httpx2 as httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        todo = iter(range(n))
        results: list[dict] = []

        async def worker() -> None:
            for i in todo:
                payload = {"model": model, "messages": prompts[i % len(prompts)], "max_tokens": max_tokens,
                           "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                try:
                    results.append(await _stream_chat(client, url, payload))
                except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                    results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(results, wall, concurrency)


def http_wave(server: ServerProcess, model: str, prompts, concurrency: int, n: int, max_tokens: int) -> dict:
    return asyncio.run(_http_wave(server.url, model, prompts, concurrency, n, max_tokens))


def inproc_wave(engine, prompts, concurrency: int, n: int, max_tokens: int) -> dict:
    """The engine with no HTTP: `engine.stream` one request at a time at concurrency 1, else the server's
    Scheduler (same batch size and queue as `slmops serve`'s defaults) with `concurrency` requests in flight."""
    from slmops.engines import GenerationRequest

    def request(i: int) -> GenerationRequest:
        return GenerationRequest(messages=prompts[i % len(prompts)], max_new_tokens=max_tokens, temperature=0.0)

    results: list[dict] = []
    t0 = time.perf_counter()
    if concurrency == 1:
        for i in range(n):
            ts = time.perf_counter()
            ttft, tokens = None, 0
            for ev in engine.stream(request(i)):
                if ttft is None and ev.text:
                    ttft = time.perf_counter() - ts
                tokens = ev.completion_tokens
            results.append({"ok": True, "ttft": ttft, "tokens": tokens})
        return summarize(results, time.perf_counter() - t0, 1)

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
            if nxt < n:
                submit(nxt)
                nxt += 1
        wall = time.perf_counter() - t0
    finally:
        sched.close()
    return summarize(results, wall, concurrency)


# ------------------------------------------------------------------------------------------ measurement


def measure_engine(spec: dict, prompts, arms: dict[str, Any], rounds: int, levels: list[int]) -> list[dict]:
    """Rows for one engine: `arms` maps server kind ("slmops", "in-process", "llama-cpp-python") to a running
    ServerProcess or an open engine. Concurrency 1: `rounds` interleaved rounds (order alternating), medians
    of tok/s, TTFT percentiles over every request of the rounds; higher concurrency: one wave per arm."""
    max_tokens, name = spec["max_tokens"], spec["served_name"]

    def wave(kind: str, c: int, n: int) -> dict:
        arm = arms[kind]
        if kind == "in-process":
            return inproc_wave(arm, prompts, c, n, max_tokens)
        return http_wave(arm, name, prompts, c, n, max_tokens)

    for kind in arms:  # warm-up: load, first-call costs, connection set-up
        wave(kind, 1, 2)
    rows = []
    n1 = spec["requests"][1]
    per_round: dict[str, list[dict]] = {k: [] for k in arms}
    order = list(arms)
    for r in range(rounds):
        for kind in (order if r % 2 == 0 else order[::-1]):
            res = wave(kind, 1, n1)
            per_round[kind].append(res)
            log(f"  c=1 round {r + 1} {kind:17s} {res['tok_s']:8.1f} tok/s  ttft p50 {res['ttft_p50_s']:.4f} s"
                + (f"  ERRORS {res['errors']}: {res.get('error_sample')}" if res["errors"] else ""))
    for kind, waves in per_round.items():
        ttfts = [t for w in waves for t in w["ttfts"]]  # every request of every round
        rows.append({"engine": spec["engine"], "model": spec["model"], "server": kind, "concurrency": 1,
                     "tok_s": statistics.median(w["tok_s"] for w in waves),
                     "tok_s_rounds": [round(w["tok_s"], 2) for w in waves],
                     "ttft_p50_s": quantile(ttfts, 0.5), "ttft_p95_s": quantile(ttfts, 0.95),
                     "requests": sum(w["requests"] for w in waves), "errors": sum(w["errors"] for w in waves),
                     "completion_tokens": sum(w["completion_tokens"] for w in waves), "max_tokens": max_tokens,
                     "rounds": rounds})
    for c in levels:
        if c == 1:
            continue
        for kind in order:
            res = wave(kind, c, spec["requests"][c])
            log(f"  c={c:<2d} {kind:17s} {res['tok_s']:8.1f} tok/s  ttft p50 {res['ttft_p50_s']:.4f} s  "
                f"p95 {res['ttft_p95_s']:.4f} s" + (f"  ERRORS {res['errors']}: {res.get('error_sample')}"
                                                    if res["errors"] else ""))
            rows.append({"engine": spec["engine"], "model": spec["model"], "server": kind, **res,
                         "max_tokens": max_tokens, "rounds": 1})
    inproc = {r["concurrency"]: r["tok_s"] for r in rows if r["server"] == "in-process"}
    for r in rows:
        if r["server"] != "in-process" and inproc.get(r["concurrency"]):
            r["overhead_vs_in_process"] = 1 - r["tok_s"] / inproc[r["concurrency"]]
        r.pop("ttfts", None)
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
                      "ref": student, "max_tokens": 48,
                      "requests": {1: 8, 4: 16, 16: 32} if quick else {1: 16, 4: 32, 16: 64}})
    if wanted & {"ort-genai", "llama.cpp"}:
        onnx_dir, gguf = qwen_exports(CACHE)
        small = {1: 2, 4: 4, 16: 16} if quick else {1: 4, 4: 8, 16: 16}
        if "ort-genai" in wanted:
            specs.append({"key": "ort-genai", "engine": "ort-genai", "model": "qwen2.5-0.5b-shape int4 (ONNX)",
                          "served_name": "qwen-int4", "ref": onnx_dir, "max_tokens": 32, "requests": small})
        if "llama.cpp" in wanted:
            specs.append({"key": "llama.cpp", "engine": "llama.cpp", "model": "qwen2.5-0.5b-shape q4_k_m (GGUF)",
                          "served_name": "qwen-q4km", "ref": gguf, "max_tokens": 32, "requests": small})

    from slmops.engines import open_engine

    rows: list[dict] = []
    servers_info: dict[str, float] = {}
    for spec in specs:
        log(f"{spec['engine']}: {spec['model']} ({spec['ref'].relative_to(ROOT)})")
        servers: list[ServerProcess] = []
        engine = None
        try:
            servers.append(slmops_server(spec["ref"], spec["served_name"], logs))
            arms: dict[str, Any] = {"slmops": servers[-1]}
            engine = open_engine(str(spec["ref"]), threads=THREADS)
            arms["in-process"] = engine
            if spec["key"] == "llama.cpp":
                servers.append(llama_cpp_python_server(spec["ref"], spec["served_name"], logs, engine.n_ctx))
                arms["llama-cpp-python"] = servers[-1]
            for s in servers:
                servers_info[f"{s.name} start_s"] = round(s.start_s, 1)
            engine_rows = measure_engine(spec, prompts, arms, rounds, levels)
            for s in servers:
                engine_rows_rss = round(s.rss_mb(), 1)
                for r in engine_rows:
                    if (r["server"] == "slmops" and s.name.startswith("slmops")) or r["server"] == s.name:
                        r["server_rss_mb"] = engine_rows_rss
            rows.extend(engine_rows)
        finally:
            for s in servers:
                s.stop()
            if engine is not None:
                engine.close()
            del engine
            gc.collect()

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
        "targets": targets, "rows": rows, "soak": soak_res,
        "settings": {"threads": THREADS, "rounds_c1": rounds, "levels": levels,
                     "requests": {s["engine"]: s["requests"] for s in specs},
                     "max_tokens": {s["engine"]: s["max_tokens"] for s in specs},
                     "client": "httpx2 AsyncClient, streaming chat requests, stream_options.include_usage",
                     "server_max_batch_size": 16, "server_max_queue": 64},
        "models": {s["engine"]: str(s["ref"].relative_to(ROOT)) for s in specs},
        "student_source": (student / "SOURCE").read_text().strip() if (student / "SOURCE").exists() else None,
        "server_start_s": servers_info,
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
            "overhead_vs_in_process", "errors"]
    s = payload["settings"]
    md = (f"Streaming chat requests (temperature 0, fixed max_tokens: {s['max_tokens']}) from an asyncio client in "
          f"another process; every engine with {s['threads']} threads. tok_s = completion tokens of the wave / its "
          f"wall time; TTFT = time to the first content chunk. Concurrency 1: {s['rounds_c1']} interleaved rounds "
          "(medians); in-process = the same engine with no HTTP (`engine.stream` at 1, the server's Scheduler at "
          "4 and 16).\n\n" + markdown_table(rows, cols) + "\n")
    by = payload["server_overhead_c1_by_engine"]
    md += ("## Headline figures\n\n"
           f"- server_overhead_c1 (demo student, torch): **{_fmt(payload['server_overhead_c1'], '.1%')}** "
           "(target <= 10%)\n"
           f"- scaling_c16_over_c1 (demo student through the server): **{_fmt(payload['scaling_c16_over_c1'], '.2f')}x**"
           f" (target >= 2.5x; in-process {_fmt(payload['scaling_c16_over_c1_in_process'], '.2f')}x)\n"
           "- server overhead at concurrency 1 by engine: "
           + ", ".join(f"{k}: {_fmt(v, '.1%')}" for k, v in by.items()) + "\n")
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
    md += "\nTargets: " + json.dumps(payload["targets"], indent=1) + f"\n\nWall time: {payload['wall_s']:.0f} s\n"
    jpath, mpath = write_results("serve", payload, md, out)
    log(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
