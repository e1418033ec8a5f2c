"""The OpenAI API as pydantic models, fields in the order of OpenAI's API reference.

Unknown request fields are accepted and logged (as OpenAI does with fields it does not know); fields we
know but cannot honour (tools, logit_bias, ...) are refused with a 400 naming the field. Each request turns
into engine requests with `to_generation_requests`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slmops.engines.base import GenerationRequest


class ProtocolError(Exception):
    """A request the server refuses: becomes an OpenAI error body with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ProtocolError(f"content parts of type {part.get('type')!r} are not supported (text only)",
                                    param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    model: str
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    n: int | None = Field(default=1, ge=1, le=16)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    tool_choice: Any = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must not be empty")
        return v


class CompletionRequest(_Request):
    model: str
    prompt: str | list[str]
    best_of: int | None = None
    echo: bool | None = False
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = 16
    n: int | None = Field(default=1, ge=1, le=16)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str


ROLES = ("system", "developer", "user", "assistant")


def check_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Plain {"role", "content"} dicts, after checking roles and their order: optional system/developer
    messages first, then at least one user message, the conversation ending with a user message."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            if m.role == "tool":
                raise ProtocolError("tool messages are not supported (no tool calling)", param=f"messages.{i}.role")
            raise ProtocolError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                                param=f"messages.{i}.role")
        role = "system" if m.role == "developer" else m.role
        if role == "system" and any(o["role"] != "system" for o in out):
            raise ProtocolError(f"messages[{i}] is a system message after the conversation started; "
                                "system messages go first", param=f"messages.{i}.role")
        out.append({"role": role, "content": m.text()})
    convo = [m for m in out if m["role"] != "system"]
    if not convo:
        raise ProtocolError("messages need at least one user message", param="messages")
    if convo[0]["role"] != "user":
        raise ProtocolError("the conversation must start with a user message (after any system messages)",
                            param="messages")
    if convo[-1]["role"] != "user":
        raise ProtocolError("the last message must be a user message (assistant prefill is not supported)",
                            param="messages")
    return out


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise ProtocolError("at most 4 stop sequences", param="stop")
    if any(not isinstance(s, str) or not s for s in stops):
        raise ProtocolError("stop sequences must be non-empty strings", param="stop")
    return stops


def _refuse_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.logit_bias:
        raise ProtocolError("logit_bias is not supported by this server", param="logit_bias")
    if isinstance(req, ChatCompletionRequest) and req.tools:
        raise ProtocolError("tools / function calling are not supported by this server", param="tools")
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1) and req.best_of != req.n:
            raise ProtocolError("best_of is not supported (use n)", param="best_of")
        if req.suffix:
            raise ProtocolError("suffix (fill-in-the-middle) is not supported", param="suffix")


def sampling_kwargs(req: ChatCompletionRequest | CompletionRequest, max_new_tokens: int) -> dict[str, Any]:
    """The GenerationRequest options of an OpenAI request (everything but the prompt)."""
    _refuse_unsupported(req)
    if max_new_tokens < 1:
        raise ProtocolError(f"max_tokens must be at least 1, got {max_new_tokens}", param="max_tokens")
    top = 0
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise ProtocolError("top_logprobs needs logprobs: true", param="top_logprobs")
        top = int(req.top_logprobs or 0)
    elif req.logprobs:
        top = int(req.logprobs)
    return {
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0 if req.temperature is None else float(req.temperature),
        "top_p": 1.0 if req.top_p is None else float(req.top_p),
        "stop": _stops(req.stop),
        "presence_penalty": float(req.presence_penalty or 0.0),
        "frequency_penalty": float(req.frequency_penalty or 0.0),
        "top_logprobs": top,
    }


def requested_max_tokens(req: ChatCompletionRequest | CompletionRequest, default: int) -> int:
    if isinstance(req, ChatCompletionRequest):
        for name in ("max_completion_tokens", "max_tokens"):
            v = getattr(req, name)
            if v is not None:
                if v < 1:
                    raise ProtocolError(f"{name} must be at least 1, got {v}", param=name)
                return int(v)
        return default
    if req.max_tokens is None:
        return default
    if req.max_tokens < 1:
        raise ProtocolError(f"max_tokens must be at least 1, got {req.max_tokens}", param="max_tokens")
    return int(req.max_tokens)


def to_generation_requests(base: dict[str, Any], n: int, seed: int | None) -> list[GenerationRequest]:
    """`n` engine requests for one OpenAI request; choice i samples with seed+i when a seed is given."""
    return [GenerationRequest(**base, seed=None if seed is None else seed + i) for i in range(n)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


__all__ = [
    "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "LoadRequest", "ProtocolError", "ResponseFormat",
    "check_messages", "error_body", "new_id", "requested_max_tokens", "sampling_kwargs", "to_generation_requests",
    "usage",
]
