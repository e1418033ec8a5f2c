"""The OpenAI-compatible HTTP app (FastAPI): routes, auth, limits, errors, streaming, metrics, capture.

`create_app(manager, ServerConfig(...))` builds it; `slmops serve` runs it with uvicorn. Every error is an
OpenAI-shaped body (``{"error": {"message", "type", "param", "code"}}``) with the status a client expects:
400 bad parameters, 401 missing or wrong API key, 404 unknown model/adapter/route, 413 body too large,
429 overloaded (with Retry-After), 503 shutting down or a model that failed to load; 500 only for bugs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmops import __version__
from slmops.engines.base import ContextLengthExceeded, TokenEvent
from slmops.errors import BadInputError, SlmopsError
from slmops.serve.capture import Capture
from slmops.serve.manager import ModelManager, ServedModel
from slmops.serve.metrics import ServerMetrics
from slmops.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadRequest,
    ProtocolError,
    check_messages,
    error_body,
    new_id,
    now,
    requested_max_tokens,
    sampling_kwargs,
    to_generation_requests,
    usage,
)
from slmops.serve.scheduler import Overloaded, RequestTimeout, ShuttingDown, Ticket
from slmops.serve.worker import EngineCrashed, token_text

log = logging.getLogger("slmops.serve")
access_log = logging.getLogger("slmops.serve.access")

PUBLIC_PATHS = {"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


@dataclass
class ServerConfig:
    api_key: str | None = None
    request_timeout_s: float | None = 600.0
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 512  # when a request sets none (and the context allows)
    capture: Path | None = None  # JSONL of requests and answers (chat data), off by default
    redact: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
    shutdown_grace_s: float = 30.0
    preload: bool = True


def _json_error(exc: ProtocolError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class _Choice:
    """One choice's accumulated answer."""

    def __init__(self, index: int):
        self.index = index
        self.text = ""
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.tokens: list[tuple[int, float | None, list | None]] = []
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.gaps: list[float] = []

    def add(self, ev: TokenEvent, t: float) -> None:
        if ev.token_id is not None and ev.completion_tokens > self.completion_tokens:
            if self.t_first is None:
                self.t_first = t
            elif self.t_last is not None:
                self.gaps.append(t - self.t_last)  # observed once the request ends, off the per-token path
            self.t_last = t
            self.tokens.append((ev.token_id, ev.logprob, ev.top_logprobs))
        self.text += ev.text
        self.prompt_tokens = ev.prompt_tokens
        self.completion_tokens = max(self.completion_tokens, ev.completion_tokens)
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason


DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events, written in as few socket writes as possible: the headers go out with the first
    events (the role chunk together with the first token, not before the model has produced anything), and
    the chunk that ends with ``data: [DONE]`` also ends the body (no separate empty write)."""

    def __init__(self, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send) -> None:
        started = False
        async for chunk in self.body_iterator:
            body = chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)
            if not started:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                started = True
            if body.endswith(DONE.encode()):
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if not started:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(manager: ModelManager, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = ServerMetrics(manager)
    for m in manager.models.values():
        m.on_batch = lambda name, n: metrics.batch_size.labels(name).observe(n)
    capture = Capture(config.capture, config.redact) if config.capture else None
    state = {"ready": not config.preload, "load_error": None, "stopping": False}

    async def reaper() -> None:
        period = max(0.2, min(5.0, manager.keep_alive_s / 4)) if manager.keep_alive_s > 0 else None
        while period:
            await asyncio.sleep(period)
            gone = await asyncio.to_thread(manager.reap_idle)
            for name in gone:
                log.info("model %s unloaded after %.0fs idle", name, manager.keep_alive_s)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for m in manager.models.values():
            m.loop = asyncio.get_running_loop()
        task = asyncio.create_task(reaper())
        if config.preload:
            try:
                for m in manager.models.values():
                    await asyncio.to_thread(m.load)
                state["ready"] = True
            except SlmopsError as exc:
                state["load_error"] = str(exc)
                log.error("could not load a model: %s", exc)
        try:
            yield
        finally:
            state["stopping"] = True
            task.cancel()
            await asyncio.to_thread(manager.close, config.shutdown_grace_s)

    app = FastAPI(title="slmops server", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over slmops engines (torch, ONNX Runtime GenAI, llama.cpp).")
    app.state.manager = manager
    app.state.metrics = metrics
    app.state.config = config

    # --- errors -----------------------------------------------------------------------------------
    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError):
        return _json_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = "not found: " + request.url.path if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(msg, "not_found_error" if exc.status_code == 404 else "invalid_request_error"),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    # --- middleware: auth, size limit, access log, request counter ----------------------------------
    # a plain ASGI middleware (not @app.middleware, whose BaseHTTPMiddleware passes every streamed chunk
    # through an extra task and memory stream: a measurable cost per token)
    async def gate(scope, receive, send, call_next) -> None:
        if scope["type"] != "http":
            await call_next(scope, receive, send)
            return
        t0 = time.perf_counter()
        st = scope.setdefault("state", {})
        st.update(model="", adapter="", tokens=(0, 0))
        path, method = scope["path"], scope["method"]
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = {k: v for k, v in scope["headers"] if k in (b"authorization", b"x-api-key", b"content-length")}
            if config.api_key and path not in PUBLIC_PATHS:
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else \
                    headers.get(b"x-api-key", b"").decode("latin-1")
                if not given or not hmac.compare_digest(given.encode(), config.api_key.encode()):
                    raise ProtocolError("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                        status=401, code="invalid_api_key")
            length = headers.get(b"content-length", b"").decode("latin-1")
            if length.isdigit() and int(length) > config.max_body_bytes:
                raise ProtocolError(f"request body is {length} bytes, the limit is {config.max_body_bytes}",
                                    status=413, code="request_too_large")
            await call_next(scope, receive, send_status)
        except ProtocolError as exc:
            await _json_error(exc)(scope, receive, send_status)
        finally:
            if path.startswith("/v1/") and method == "POST" and path not in ("/v1/models/load", "/v1/models/unload"):
                metrics.requests.labels(st.get("model") or "-", st.get("adapter") or "-",
                                        path.removeprefix("/v1/"), str(status[0])).inc()
            if path not in ("/health", "/metrics") and access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                tokens = st.get("tokens") or (0, 0)
                access_log.info(json.dumps({
                    "ts": round(time.time(), 3), "method": method, "path": path, "status": status[0],
                    "ms": round((time.perf_counter() - t0) * 1000, 1), "client": client[0] if client else None,
                    "model": st.get("model") or None, "adapter": st.get("adapter") or None,
                    "prompt_tokens": tokens[0], "completion_tokens": tokens[1],
                }))

    class _Gate:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            await gate(scope, receive, send, self.app)

    app.add_middleware(_Gate)

    async def read_json(request: Request) -> Any:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise ProtocolError(f"request body is larger than the limit of {config.max_body_bytes} bytes",
                                    status=413, code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError("the request body must be a JSON object")
        return body

    def parse(model_cls, body: dict[str, Any]):
        try:
            req = model_cls.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err.get("loc", ())) or None
            msg = err.get("msg", "invalid value")
            raise ProtocolError(f"{param}: {msg}" if param else msg, param=param,
                                code="invalid_value") from None
        extra = req.unknown_fields() if hasattr(req, "unknown_fields") else []
        if extra:
            log.info("ignoring unknown request fields: %s", ", ".join(extra))
        return req

    async def ensure_loaded(served: ServedModel):
        if state["stopping"]:
            raise ProtocolError("the server is shutting down", status=503, code="shutting_down")
        try:
            return served.loaded or await asyncio.to_thread(served.load)
        except SlmopsError as exc:
            raise ProtocolError(f"model {served.name} could not be loaded: {exc.message}", status=503,
                                code="model_load_failed") from None

    def resolve(model: str) -> tuple[ServedModel, str | None]:
        try:
            return manager.resolve(model)
        except KeyError as exc:
            raise ProtocolError(str(exc.args[0]), status=404, param="model", code="model_not_found") from None

    # --- generation -------------------------------------------------------------------------------
    async def start(request: Request, req, kind: str, prompts: list[dict[str, Any]]):
        """Submit every choice of every prompt; returns (served, loaded, tickets, queue, meta)."""
        served, adapter = resolve(req.model)
        request.state.model, request.state.adapter = served.name, adapter or ""
        fmt = getattr(req, "response_format", None)
        json_mode = fmt is not None and fmt.type == "json_object"
        schema = None
        if fmt is not None and fmt.type == "json_schema":
            schema = (fmt.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise ProtocolError("response_format json_schema needs json_schema.schema, a JSON schema object",
                                    param="response_format")
        loaded = await ensure_loaded(served)
        engine = loaded.engine
        if schema is not None and not getattr(engine, "supports_json_schema", False):
            raise ProtocolError(f"response_format json_schema needs a model on the llama.cpp engine (a GGUF "
                                f"export, which follows the schema with a grammar); {served.name} runs on the "
                                f"{engine.name} engine: use json_object and validate the answer",
                                param="response_format")
        n = int(req.n or 1)
        explicit = bool({"max_tokens", "max_completion_tokens"} & req.model_fields_set)
        want = requested_max_tokens(req, config.default_max_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        tickets: list[Ticket] = []
        served.in_flight += 1
        served.last_used = time.monotonic()
        prompt_param = "messages" if kind == "chat" else "prompt"
        pending: deque = deque()  # filled by the scheduler's thread, emptied into `queue` on the loop
        woken = [False]

        def drain() -> None:
            woken[0] = False
            while pending:
                queue.put_nowait(pending.popleft())

        try:
            for p_i, prompt in enumerate(prompts):
                try:
                    gen_reqs = to_generation_requests({**prompt, **sampling_kwargs(req, want), "adapter": adapter,
                                                       "json_mode": json_mode, "json_schema": schema}, n, req.seed)
                except BadInputError as exc:
                    raise ProtocolError(exc.message) from None
                for j, gr in enumerate(gen_reqs):
                    index = p_i * n + j

                    def deliver(item, at=None, index=index):  # `at`: when the engine made it, if known
                        pending.append((index, item, at or time.perf_counter()))
                        if not woken[0]:  # one loop wake-up for the events that arrive together
                            woken[0] = True
                            loop.call_soon_threadsafe(drain)

                    try:
                        tickets.append(loaded.scheduler.submit(gr, deliver, timeout=config.request_timeout_s,
                                                               fit="strict" if explicit else "clamp"))
                    except ContextLengthExceeded as exc:
                        raise ProtocolError(exc.message, param="max_tokens" if exc.param == "max_tokens"
                                            else prompt_param, code="context_length_exceeded") from None
                    except Overloaded as exc:
                        raise ProtocolError(exc.message, status=429, code="overloaded",
                                            headers={"Retry-After": str(int(exc.retry_after + 0.999))}) from None
                    except ShuttingDown as exc:
                        raise ProtocolError(exc.message, status=503, code="shutting_down") from None
                    except EngineCrashed as exc:
                        raise ProtocolError(exc.message, status=503, code="engine_crashed") from None
                    except BadInputError as exc:
                        status = 404 if "adapter" in exc.message else 400
                        raise ProtocolError(exc.message, status=status,
                                            param="model" if status == 404 else prompt_param,
                                            code="model_not_found" if status == 404 else None) from None
        except BaseException:
            for t in tickets:
                t.cancel()
            served.in_flight -= 1
            raise
        return served, engine, tickets, queue

    async def events(served: ServedModel, tickets: list[Ticket], queue: asyncio.Queue, t0: float,
                     ) -> AsyncIterator[tuple[int, TokenEvent | None]]:
        """(choice index, event) until every choice is done; (index, None) when a choice ends."""
        left = len(tickets)
        try:
            while left:
                index, item, t = await queue.get()
                if isinstance(item, BaseException):
                    if isinstance(item, RequestTimeout):
                        raise ProtocolError(f"the request timed out after {config.request_timeout_s:.0f}s",
                                            status=503, code="timeout")
                    if isinstance(item, ShuttingDown):
                        raise ProtocolError(str(item.message), status=503, code="shutting_down")
                    if isinstance(item, EngineCrashed):
                        raise ProtocolError(str(item.message), status=503, code="engine_crashed")
                    raise item
                if item is None:
                    left -= 1
                yield index, item, t
        finally:
            for tk in tickets:
                tk.cancel()
            served.in_flight -= 1
            served.last_used = time.monotonic()

    def logprob_items(engine, choice: _Choice) -> list[dict[str, Any]]:
        out = []
        for tok, lp, top in choice.tokens:
            text = token_text(engine, tok)
            out.append({"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": (tt := token_text(engine, t)), "logprob": v,
                                          "bytes": list(tt.encode("utf-8"))} for t, v in (top or [])]})
        return out

    def completion_logprobs(engine, choice: _Choice, offset: int) -> dict[str, Any]:
        toks, lps, tops, offs = [], [], [], []
        pos = offset
        for tok, lp, top in choice.tokens:
            text = token_text(engine, tok)
            toks.append(text)
            lps.append(lp)
            tops.append({token_text(engine, t): v for t, v in (top or [])})
            offs.append(pos)
            pos += len(text)
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def observe(served: ServedModel, choices: dict[int, _Choice], n: int, t0: float,
                request: Request) -> tuple[int, int]:
        """Token usage (each prompt counted once, not per choice) and the request's metrics."""
        prompt = sum(c.prompt_tokens for i, c in choices.items() if i % n == 0)
        completion = sum(c.completion_tokens for c in choices.values())
        name = served.name
        metrics.prompt_tokens.labels(name).inc(prompt)
        metrics.completion_tokens.labels(name).inc(completion)
        itl = metrics.itl.labels(name)
        for c in choices.values():
            for gap in c.gaps:
                itl.observe(gap)
        firsts = [c.t_first for c in choices.values() if c.t_first is not None]
        if firsts:
            metrics.ttft.labels(name).observe(min(firsts) - t0)
        metrics.e2e.labels(name).observe(time.perf_counter() - t0)
        request.state.tokens = (prompt, completion)
        return prompt, completion

    async def watch_disconnect(request: Request, tickets: list[Ticket]) -> None:
        while True:
            await asyncio.sleep(0.25)
            if await request.is_disconnected():
                for t in tickets:
                    t.cancel()
                return

    async def collect(request: Request, served, tickets, queue, t0) -> dict[int, _Choice]:
        choices = {i: _Choice(i) for i in range(len(tickets))}
        watcher = asyncio.create_task(watch_disconnect(request, tickets))
        try:
            async for index, ev, t in events(served, tickets, queue, t0):
                if ev is not None:
                    choices[index].add(ev, t)
        finally:
            watcher.cancel()
        return choices

    async def sse_body(served: ServedModel, tickets: list[Ticket], queue: asyncio.Queue, t0: float,
                       head: list[str], render, finish) -> AsyncIterator[str]:
        """The SSE stream of a streaming request: `head` chunks, then `render(choice, event, tokens_before)`
        chunks per event, then `finish(choices)` chunks and [DONE]. Whatever arrived together goes out in one
        write; the last events go out with [DONE]. An error after the 200 is reported in-band, as OpenAI does."""
        choices = {i: _Choice(i) for i in range(len(tickets))}
        parts: list[str] = list(head)
        ended = 0
        try:
            async for index, ev, t in events(served, tickets, queue, t0):
                if ev is None:
                    ended += 1
                else:
                    c = choices[index]
                    before = len(c.tokens)
                    c.add(ev, t)
                    parts.extend(render(c, ev, before))
                if parts and queue.empty() and ended < len(tickets):
                    yield "".join(parts)
                    parts = []
            parts.extend(finish(choices))
            parts.append(DONE)
        except ProtocolError as exc:
            parts.append(f"data: {json.dumps(exc.body())}\n\n")
        yield "".join(parts)

    # --- routes -------------------------------------------------------------------------------------
    def _schema(model_cls) -> dict[str, Any]:
        return {"requestBody": {"required": True,
                                "content": {"application/json": {"schema": model_cls.model_json_schema(
                                    ref_template="#/components/schemas/{model}")}}}}

    @app.get("/health", summary="Liveness")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the models are loaded")
    async def ready():
        models = {m.name: m.loaded is not None for m in manager.models.values()}
        if state["load_error"]:
            return JSONResponse({"status": "error", "error": state["load_error"], "models": models}, status_code=503)
        if not state["ready"] or state["stopping"]:
            return JSONResponse({"status": "starting" if not state["stopping"] else "stopping", "models": models},
                                status_code=503)
        return {"status": "ready", "models": models}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.refresh()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="List models (and model:adapter entries)")
    async def list_models():
        data = []
        for m in manager.models.values():
            created = int(m.loaded.loaded_at) if m.loaded else 0
            data.append({"id": m.name, "object": "model", "created": created, "owned_by": "slmops",
                         "loaded": m.loaded is not None})
            for a in m.adapters():
                data.append({"id": f"{m.name}:{a}", "object": "model", "created": created, "owned_by": "slmops",
                             "parent": m.name, "loaded": m.loaded is not None})
        return {"object": "list", "data": data}

    def _served(name: str) -> ServedModel:
        if name not in manager.models:
            raise ProtocolError(f"the model {name!r} does not exist (served: {', '.join(manager.models)})",
                                status=404, param="model", code="model_not_found")
        return manager.models[name]

    @app.post("/v1/models/load", summary="Load a declared model now", openapi_extra=_schema(LoadRequest))
    async def load_model(request: Request):
        req = parse(LoadRequest, await read_json(request))
        served = _served(req.model)
        loaded = await ensure_loaded(served)
        served.last_used = time.monotonic()
        return {"id": served.name, "loaded": True, "load_s": round(loaded.load_s, 3)}

    @app.post("/v1/models/unload", summary="Unload a model (it loads again on its next request)",
              openapi_extra=_schema(LoadRequest))
    async def unload_model(request: Request):
        req = parse(LoadRequest, await read_json(request))
        served = _served(req.model)
        was = await asyncio.to_thread(served.unload, config.shutdown_grace_s)
        return {"id": served.name, "loaded": False, "was_loaded": was}

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI)", openapi_extra=_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        req = parse(ChatCompletionRequest, await read_json(request))
        messages = check_messages(req.messages)
        served, engine, tickets, queue = await start(request, req, "chat", [{"messages": messages}])
        cid, created = new_id("chatcmpl"), now()
        model_id = req.model
        want_lp = bool(req.logprobs)
        if not req.stream:
            choices = await collect(request, served, tickets, queue, t0)
            prompt, completion = observe(served, choices, len(tickets), t0, request)
            if capture:
                capture.write({"messages": messages + [{"role": "assistant", "content": choices[0].text}],
                               "metadata": {"model": model_id, "created": created, "id": cid}})
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": {"content": logprob_items(engine, c)} if want_lp else None,
                                 "finish_reason": c.finish_reason or "length"} for i, c in choices.items()],
                    "usage": usage(prompt, completion), "system_fingerprint": f"slmops-{__version__}"})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices_part: list[dict[str, Any]], use=None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "system_fingerprint": f"slmops-{__version__}", "choices": choices_part}
            if include_usage:
                body["usage"] = use
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        # the per-token chunk, pre-rendered around the text (the same JSON as `chunk` writes)
        head = chunk([{"index": 0}]).split('[{"index": 0}]')
        text_head, text_tail = head[0] + '[{"index": ', ', "logprobs": null, "finish_reason": null}]' + head[1]

        def text_chunk(index: int, text: str) -> str:
            return f'{text_head}{index}, "delta": {{"content": {json.dumps(text, ensure_ascii=False)}}}{text_tail}'

        def render(c: _Choice, ev: TokenEvent, before: int) -> list[str]:
            out = []
            if want_lp and len(c.tokens) > before:
                part = _Choice(c.index)
                part.tokens = c.tokens[before:]
                out.append(chunk([{"index": c.index, "delta": {"content": ev.text},
                                   "logprobs": {"content": logprob_items(engine, part)}, "finish_reason": None}]))
            elif ev.text:
                out.append(text_chunk(c.index, ev.text))
            if ev.finish_reason:
                out.append(chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                   "finish_reason": ev.finish_reason}]))
            return out

        def finish(choices: dict[int, _Choice]) -> list[str]:
            prompt, completion = observe(served, choices, len(tickets), t0, request)
            if capture:
                capture.write({"messages": messages + [{"role": "assistant", "content": choices[0].text}],
                               "metadata": {"model": model_id, "created": created, "id": cid}})
            return [chunk([], usage(prompt, completion))] if include_usage else []

        head = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]) for i in range(len(tickets))]
        return SSEResponse(sse_body(served, tickets, queue, t0, head, render, finish))

    @app.post("/v1/completions", summary="Text completion (OpenAI legacy)", openapi_extra=_schema(CompletionRequest))
    async def completions(request: Request):
        t0 = time.perf_counter()
        req = parse(CompletionRequest, await read_json(request))
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or any(not isinstance(p, str) or not p for p in prompts):
            raise ProtocolError("prompt must be a non-empty string or a list of them (token ids are not accepted)",
                                param="prompt")
        n = int(req.n or 1)
        served, engine, tickets, queue = await start(request, req, "completion", [{"prompt": p} for p in prompts])
        cid, created = new_id("cmpl"), now()
        want_lp = req.logprobs is not None

        def prefix(index: int) -> str:
            return prompts[index // n] if req.echo else ""

        if not req.stream:
            choices = await collect(request, served, tickets, queue, t0)
            prompt, completion = observe(served, choices, n, t0, request)
            if capture:
                capture.write({"prompt": prompts[0], "completion": choices[0].text,
                               "metadata": {"model": req.model, "created": created, "id": cid}})
            return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": i, "text": prefix(i) + c.text,
                                 "logprobs": completion_logprobs(engine, c, len(prefix(i))) if want_lp else None,
                                 "finish_reason": c.finish_reason or "length"} for i, c in choices.items()],
                    "usage": usage(prompt, completion), "system_fingerprint": f"slmops-{__version__}"})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices_part, use=None) -> str:
            body = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                    "system_fingerprint": f"slmops-{__version__}", "choices": choices_part}
            if include_usage:
                body["usage"] = use
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def render(c: _Choice, ev: TokenEvent, before: int) -> list[str]:
            lp = None
            if want_lp and len(c.tokens) > before:
                part = _Choice(c.index)
                part.tokens = c.tokens[before:]
                lp = completion_logprobs(engine, part, len(prefix(c.index)) + len(c.text) - len(ev.text))
            if ev.text or lp or ev.finish_reason:
                return [chunk([{"index": c.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])]
            return []

        def finish(choices: dict[int, _Choice]) -> list[str]:
            prompt, completion = observe(served, choices, n, t0, request)
            if capture:
                capture.write({"prompt": prompts[0], "completion": choices[0].text,
                               "metadata": {"model": req.model, "created": created, "id": cid}})
            return [chunk([], usage(prompt, completion))] if include_usage else []

        head = [chunk([{"index": i, "text": prefix(i), "logprobs": None, "finish_reason": None}])
                for i in range(len(tickets))] if req.echo else []
        return SSEResponse(sse_body(served, tickets, queue, t0, head, render, finish))

    return app


__all__ = ["ServerConfig", "create_app"]
