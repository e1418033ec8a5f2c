"""The `openai-http` engine: any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, SGLang, TGI,
Foundry Local, `slmops serve`, OpenAI itself) behind the Engine protocol.

Requests run concurrently on an asyncio event loop (httpx ``AsyncClient``): at most `concurrency` are in
flight at once, optionally paced by `max_rps`. Every attempt that fails with HTTP 408/429/5xx, a
connection error or a timeout is retried with exponential backoff and full jitter (``uniform(0,
min(backoff_max, backoff_base * 2**attempt))``), or after the server's ``Retry-After`` when it sends one;
other 4xx answers are not retried and raise with the server's own error message.

Chat requests (`messages`) go to ``/v1/chat/completions``, raw prompts to ``/v1/completions``. The server
renders chat templates and counts tokens, so `tokenize` and `render` are not available and `logprobs`
returns None.

Three ways to generate:

- ``generate(requests)``: results in request order; raises the first failure (and cancels the rest).
- ``generate_settled(requests)``: one result *or exception* per request; a failure never aborts the batch.
- ``iter_settled(requests)``: ``(index, result | exception)`` pairs as they complete, from a lazy iterable
  of requests (distillation uses this: rows are written as soon as they are ready and a slow request does
  not hold up the others).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from slmops.engines.base import EngineInfo, GenerationRequest, GenerationResult, TokenEvent
from slmops.errors import BadInputError, SlmopsError

API_KEY_ENV = ("SLMOPS_API_KEY", "OPENAI_API_KEY")
RETRY_AFTER_CAP_S = 60.0  # a Retry-After longer than this is shortened to it


def _httpx():
    """The httpx module (httpx2, which huggingface_hub already requires, or classic httpx)."""
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - depends on the environment
        import httpx
    return httpx


class RemoteError(SlmopsError):
    """A request to an OpenAI-compatible server failed.

    `kind` is ``http-<status>``, ``connection``, ``timeout`` or ``bad-response``; `detail` the server's
    message (or the transport error); `attempts` how many tries were made. `summary` (kind + detail, no
    URL or attempt count) is what distillation groups failures by.
    """

    def __init__(self, kind: str, detail: str, url: str = "", *, status: int | None = None,
                 retryable: bool = False, retry_after: float | None = None, attempts: int = 1):
        self.kind = kind
        self.detail = detail
        self.url = url
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.attempts = attempts
        hint = None
        if kind == "connection":
            hint = "is the server running and is the base URL right? (e.g. http://127.0.0.1:8000/v1)"
        elif status in (401, 403):
            hint = "pass --api-key or set SLMOPS_API_KEY / OPENAI_API_KEY"
        elif status == 404:
            hint = "check the base URL and the model name (GET <base>/v1/models lists the models)"
        super().__init__(self._message(), hint)

    @property
    def summary(self) -> str:
        return f"{self.kind}: {self.detail}"

    def _message(self) -> str:
        tries = f" (gave up after {self.attempts} attempts)" if self.attempts > 1 else ""
        where = f" from {self.url}" if self.url else ""
        return f"{self.kind}{where}: {self.detail}{tries}"

    def with_attempts(self, attempts: int) -> RemoteError:
        self.attempts = attempts
        self.message = self._message()
        self.args = (self.message,)
        return self


@dataclass
class RemoteGenerationResult(GenerationResult):
    """A GenerationResult with what only a remote call has: the served model, the server's own
    finish reason (``content_filter``, ``tool_calls``...) and how many attempts it took."""

    model: str = ""
    server_finish_reason: str | None = None
    attempts: int = 1


class _Pacer:
    """Requests per second limit: a token bucket of capacity 1. Each send waits until `1/max_rps` after
    the previous *actual* send (under a lock), so no burst ever exceeds the rate, even after the event
    loop was starved for a while."""

    def __init__(self, max_rps: float):
        self.interval = 1.0 / max_rps
        self.last: float | None = None
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        async with self.lock:
            if self.last is not None:
                delay = self.last + self.interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            self.last = loop.time()


def split_base_url(url: str) -> tuple[str, str | None]:
    """``"http://h:8000/v1#my-model"`` -> (``"http://h:8000/v1"``, ``"my-model"``): the API root, with
    ``/v1`` added when missing (a full endpoint such as ``.../v1/chat/completions`` is cut back), and the
    model named after ``#`` if any."""
    model = None
    if "#" in url:
        url, model = url.split("#", 1)
        model = model or None
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/models"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    if not url.startswith(("http://", "https://")):
        raise BadInputError(f"not an http(s) URL: {url!r}", "e.g. http://127.0.0.1:8000/v1")
    if not url.endswith("/v1"):
        url += "/v1"
    return url, model


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_detail(resp) -> str:
    """The server's error message from an OpenAI-style error body (or the raw text)."""
    text = resp.text
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:300] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)[:300]
            return str(msg)
        if isinstance(err, str):
            return err
        if "detail" in body:
            return str(body["detail"])[:300]
    return text.strip()[:300]


class OpenAIHTTPEngine:
    """An OpenAI-compatible server as an Engine (see the module docstring)."""

    name = "openai-http"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, *,
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5,
                 max_rps: float | None = None, backoff_base: float = 0.5, backoff_max: float = 20.0,
                 headers: dict[str, str] | None = None, stream_usage: bool = True):
        self.base_url, url_model = split_base_url(base_url)
        self._model = model or url_model
        if concurrency < 1:
            raise BadInputError(f"concurrency must be >= 1, got {concurrency}")
        if timeout <= 0:
            raise BadInputError(f"timeout must be > 0 seconds, got {timeout}")
        if max_retries < 0:
            raise BadInputError(f"max_retries must be >= 0, got {max_retries}")
        if max_rps is not None and max_rps <= 0:
            raise BadInputError(f"max_rps must be > 0, got {max_rps}")
        if backoff_base < 0 or backoff_max < 0:
            raise BadInputError("backoff_base and backoff_max must be >= 0")
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_rps = max_rps
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stream_usage = stream_usage
        key = api_key or next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
        self._headers = {"Accept": "application/json", **(headers or {})}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._sync = None
        self._rng = random.Random()

    def __repr__(self) -> str:  # never shows the api key
        return f"OpenAIHTTPEngine({self.base_url!r}, model={self._model!r}, concurrency={self.concurrency})"

    # --- model -----------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        """The served model: as given, else the first id that ``GET /v1/models`` lists."""
        if self._model is None:
            data = self._get_json("/models")
            models = data.get("data") if isinstance(data, dict) else None
            ids = [m.get("id") for m in models or [] if isinstance(m, dict) and m.get("id")]
            if not ids:
                raise RemoteError("bad-response", "GET /models listed no models", self.base_url + "/models")
            self._model = str(ids[0])
        return self._model

    def _client(self):
        if self._sync is None:
            httpx = _httpx()
            self._sync = httpx.Client(headers=self._headers, timeout=self._timeouts())
        return self._sync

    def _timeouts(self):
        httpx = _httpx()
        return httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))

    def _get_json(self, path: str) -> Any:
        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            err = self._classify(lambda: self._client().get(url), url)
            if not isinstance(err, RemoteError):
                try:
                    return err.json()
                except ValueError:
                    raise RemoteError("bad-response", f"GET {path} did not return JSON", url) from None
            if not err.retryable or attempt == self.max_retries:
                raise err.with_attempts(attempt + 1)
            time.sleep(self._delay(attempt, err.retry_after))
        raise AssertionError("unreachable")

    def _transport_error(self, exc: Exception, url: str) -> RemoteError:
        """A RemoteError for an exception raised while sending; non-transport exceptions re-raise."""
        httpx = _httpx()
        if isinstance(exc, httpx.TimeoutException):
            return RemoteError("timeout", f"no answer within {self.timeout:g} s ({type(exc).__name__})", url,
                               retryable=True)
        if isinstance(exc, httpx.TransportError):
            return RemoteError("connection", f"{type(exc).__name__}: {exc}".rstrip(": "), url, retryable=True)
        raise exc

    def _classify(self, send, url: str):
        """Run `send()`: the response if it is a success, else a RemoteError saying what failed."""
        try:
            resp = send()
        except Exception as exc:  # noqa: BLE001 - classified
            return self._transport_error(exc, url)
        return resp if resp.status_code < 400 else self._status_error(resp, url)

    def _status_error(self, resp, url: str) -> RemoteError:
        status = resp.status_code
        retryable = status in (408, 429) or status >= 500
        return RemoteError(f"http-{status}", _error_detail(resp), url, status=status, retryable=retryable,
                           retry_after=_retry_after(resp.headers.get("retry-after")))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP_S)
        return self._rng.uniform(0.0, min(self.backoff_max, self.backoff_base * (2 ** attempt)))

    # --- requests --------------------------------------------------------------------------------
    def _body(self, req: GenerationRequest, stream: bool = False) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model}
        if req.messages is not None:
            path = "/chat/completions"
            body["messages"] = [dict(m) for m in req.messages]
        else:
            path = "/completions"
            body["prompt"] = req.prompt
        body["max_tokens"] = req.max_new_tokens
        body["temperature"] = req.temperature
        body["top_p"] = req.top_p
        if req.top_k:
            body["top_k"] = req.top_k  # not in OpenAI's API; vLLM, llama.cpp and SGLang accept it
        if req.stop:
            body["stop"] = list(req.stop)
        if req.seed is not None:
            body["seed"] = req.seed
        if stream:
            body["stream"] = True
            if self.stream_usage:
                body["stream_options"] = {"include_usage": True}
        return self.base_url + path, body

    def _parse(self, resp, url: str, chat: bool, t0: float, attempts: int) -> RemoteGenerationResult:
        latency = time.perf_counter() - t0
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RemoteError("bad-response", f"not an OpenAI completion: {resp.text[:200]!r}", url) from None
        usage = data.get("usage") or {}
        raw_reason = choice.get("finish_reason")
        return RemoteGenerationResult(
            text=text or "", token_ids=[], finish_reason="length" if raw_reason == "length" else "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            ttft_s=latency, latency_s=latency, model=str(data.get("model") or self.model),
            server_finish_reason=raw_reason, attempts=attempts,
        )

    async def _call(self, client, sem: asyncio.Semaphore, pacer: _Pacer | None,
                    req: GenerationRequest) -> RemoteGenerationResult:
        url, body = self._body(req)
        t0 = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            if pacer is not None:
                await pacer.wait()
            async with sem:  # a slot is held only while a request is in flight, not while backing off
                try:
                    resp = await client.post(url, json=body)
                except Exception as exc:  # noqa: BLE001 - classified (non-transport errors re-raise)
                    err = self._transport_error(exc, url)
                else:
                    if resp.status_code < 400:
                        return self._parse(resp, url, req.messages is not None, t0, attempt + 1)
                    err = self._status_error(resp, url)
            if not err.retryable or attempt == self.max_retries:
                raise err.with_attempts(attempt + 1)
            await asyncio.sleep(self._delay(attempt, err.retry_after))
        raise AssertionError("unreachable")

    async def _drive(self, requests: Iterable[GenerationRequest], emit, stop: threading.Event) -> None:
        """Run `requests` with at most `concurrency` in flight; `emit((index, result | exception))` each
        as it completes. Requests are taken from the iterable lazily (a window of 2 x concurrency)."""
        httpx = _httpx()
        sem = asyncio.Semaphore(self.concurrency)
        pacer = _Pacer(self.max_rps) if self.max_rps else None
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        window = 2 * self.concurrency
        pending: set[asyncio.Task] = set()

        async def one(i: int, req: GenerationRequest):
            try:
                return i, await self._call(client, sem, pacer, req)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - settled: the caller decides
                return i, exc

        async def reap(block: bool) -> None:
            nonlocal pending
            while pending and (block or len(pending) >= window):
                done, pending = await asyncio.wait(pending, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    emit(task.result())
                if stop.is_set():
                    raise asyncio.CancelledError
                if not block and len(pending) < window:
                    return

        async with httpx.AsyncClient(headers=self._headers, timeout=self._timeouts(), limits=limits) as client:
            try:
                for i, req in enumerate(requests):
                    if stop.is_set():
                        raise asyncio.CancelledError
                    pending.add(asyncio.create_task(one(i, req)))
                    await reap(block=False)
                await reap(block=True)
            finally:
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)

    def iter_settled(self, requests: Iterable[GenerationRequest]) -> Iterator[tuple[int, GenerationResult | Exception]]:
        """``(index, result | exception)`` for every request, in completion order (see module doc).

        The requests run on an event loop in a background thread, so this works from any caller, inside
        a running event loop too. Closing the iterator early cancels what is still in flight.
        """
        self.model  # noqa: B018 - resolve the model once, before the workers start
        out: queue.Queue = queue.Queue()
        stop = threading.Event()
        finished = object()

        def runner() -> None:
            try:
                asyncio.run(self._drive(requests, out.put, stop))
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                out.put(("fatal", exc))
            finally:
                out.put(finished)

        thread = threading.Thread(target=runner, name="openai-http", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = out.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is finished:
                    return
                if item[0] == "fatal":
                    raise item[1]
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    def generate_settled(self, requests: list[GenerationRequest]) -> list[GenerationResult | Exception]:
        """One result or exception per request, in request order; a failure never aborts the others."""
        results: list[GenerationResult | Exception | None] = [None] * len(requests)
        for i, res in self.iter_settled(requests):
            results[i] = res
        return results  # type: ignore[return-value]

    # --- protocol --------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Results in request order; the first request that finally fails raises (the rest are cancelled)."""
        results: list[GenerationResult | None] = [None] * len(requests)
        it = self.iter_settled(requests)
        try:
            for i, res in it:
                if isinstance(res, Exception):
                    raise res
                results[i] = res
        finally:
            it.close()
        return results  # type: ignore[return-value]

    def stream(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        """Server-sent events (``stream: true``); connection errors, 429 and 5xx are retried until the
        first event arrives. `token_id` is None (the server sends text, not ids)."""
        url, body = self._body(request, stream=True)
        chat = request.messages is not None
        client = self._client()
        for attempt in range(self.max_retries + 1):
            ctx = client.stream("POST", url, json=body, headers={"Accept": "text/event-stream"})
            try:
                resp = ctx.__enter__()
            except Exception as exc:  # noqa: BLE001 - classified below
                err = self._transport_error(exc, url)
            else:
                if resp.status_code < 400:
                    try:
                        yield from self._events(resp, url, chat)
                    finally:
                        ctx.__exit__(None, None, None)
                    return
                resp.read()
                err = self._status_error(resp, url)
                ctx.__exit__(None, None, None)
            if not err.retryable or attempt == self.max_retries:
                raise err.with_attempts(attempt + 1)
            time.sleep(self._delay(attempt, err.retry_after))

    def _events(self, resp, url: str, chat: bool) -> Iterator[TokenEvent]:
        httpx = _httpx()
        finish: str | None = None
        usage: dict = {}
        try:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    raise RemoteError("bad-response", f"bad stream event: {payload[:200]!r}", url) from None
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
                    finish = choice.get("finish_reason") or finish
                    if text:
                        yield TokenEvent(token_id=None, text=text)
        except httpx.TransportError as exc:
            raise RemoteError("connection", f"stream broken: {type(exc).__name__}: {exc}", url) from exc
        yield TokenEvent(token_id=None, text="", finish_reason="length" if finish == "length" else "stop",
                         prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0))

    def info(self) -> EngineInfo:
        return EngineInfo(
            name=self.name, format="remote", precision="unknown", parameters=None, bytes_on_disk=None,
            device="remote", path=self.base_url,
            extra={"model": self.model, "concurrency": self.concurrency, "max_rps": self.max_rps},
        )

    def tokenize(self, text: str) -> list[int]:
        raise SlmopsError(
            "the openai-http engine cannot tokenize: the server holds the tokenizer",
            "open the model locally (folder, .gguf or artifact) to count tokens",
        )

    def render(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        raise SlmopsError(
            "the openai-http engine cannot render chat messages: the server applies its own chat template",
            "open the model locally to see the rendered prompt",
        )

    def logprobs(self, texts: list[str]) -> None:
        return None  # prompt logprobs are not part of the OpenAI API (some servers have extensions)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None
