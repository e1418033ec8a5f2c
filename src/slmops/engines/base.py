"""The Engine protocol: the one path every model run goes through.

Teacher generation, evaluation, benchmarks and serving all take an `Engine`, so a quantized export, a
student and a remote teacher are measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from slmops.errors import BadInputError

FinishReason = Literal["stop", "length"]

# `GenerationRequest.adapter` value that asks for the base model with every adapter off (an engine opened on
# an adapter folder uses that adapter for requests that name none); no adapter may be called this.
BASE_ADAPTER = "base"


class ContextLengthExceeded(BadInputError):
    """The prompt (or the prompt plus the tokens asked for) does not fit the model's context. `param` is
    what to change: "prompt" or "max_tokens"."""

    def __init__(self, message: str, hint: str | None = None, param: str = "prompt"):
        super().__init__(message, hint)
        self.param = param


def refuse_json_schema(engine_name: str, request: GenerationRequest) -> None:
    """For engines without grammars: a request with a JSON schema is refused with what to do instead."""
    if request.json_schema is not None:
        raise BadInputError(f"the {engine_name} engine cannot constrain answers to a JSON schema",
                            "use response_format json_object (any JSON object) and validate the answer, or "
                            "serve a GGUF export (llama.cpp engine), which follows JSON schemas with a grammar")


def prompt_too_long(n_prompt: int, context: int) -> ContextLengthExceeded:
    return ContextLengthExceeded(f"the prompt is {n_prompt} tokens, the model's context is {context}",
                                 "shorten the prompt")


@dataclass
class GenerationRequest:
    """One generation. Give `messages` (rendered with the model's chat template) or a raw `prompt`.

    `temperature == 0` means greedy. `seed` makes sampling reproducible per request, whatever else is in
    the batch. Generation ends at the tokenizer's end-of-turn token, at any of `stop` (not included in
    the text) or after `max_new_tokens`.

    `adapter` names one of the engine's loaded adapters (e.g. LoRA) to generate with; None uses the
    engine's default (the base model, unless the engine was opened on an adapter folder) and
    :data:`BASE_ADAPTER` ("base") always the base model. Engines without adapters reject any other name.
    """

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: str | None = None
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    top_logprobs: int = 0  # also report the n most likely tokens (and log-probabilities) at each step
    json_mode: bool = False  # constrain the answer to one JSON object (OpenAI's response_format json_object)
    # constrain the answer to this JSON schema (OpenAI's response_format json_schema): engines with grammars
    json_schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise BadInputError(f"adapter must be a non-empty name or None, got {self.adapter!r}")
        if (self.messages is None) == (self.prompt is None):
            raise BadInputError("a GenerationRequest needs exactly one of `messages` or `prompt`")
        if self.max_new_tokens < 1:
            raise BadInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise BadInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BadInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 4:
            raise BadInputError("at most 4 stop strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise BadInputError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise BadInputError("json_schema must be a JSON object (a JSON schema)")
        if not 0 <= self.top_logprobs <= 20:
            raise BadInputError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # time from the call to the first generated token
    latency_s: float  # time from the call to the last token

    @property
    def decode_tokens_per_s(self) -> float:
        span = self.latency_s - self.ttft_s
        return (self.completion_tokens - 1) / span if self.completion_tokens > 1 and span > 0 else 0.0


@dataclass
class TokenEvent:
    """One streamed step: `text` is the new text since the last event (may be empty while a multi-byte
    character or a possible stop string is held back)."""

    token_id: int | None
    text: str
    logprob: float | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # (token id, log-probability) of the most likely tokens at this step, when the request asked for them
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Logprobs:
    """Per-token log-probabilities of a text under the model: `logprobs[i]` is log p(token_i | tokens<i);
    the first token has no context and is None."""

    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float | None]

    @property
    def total(self) -> float:
        return sum(lp for lp in self.logprobs if lp is not None)

    @property
    def scored_tokens(self) -> int:
        return sum(1 for lp in self.logprobs if lp is not None)


@dataclass
class EngineInfo:
    name: str
    format: str  # "hf", "onnx", "gguf", "remote"
    precision: str  # "fp32", "bf16", "int4", ...
    parameters: int | None
    bytes_on_disk: int | None
    device: str
    path: str
    context_length: int | None = None
    vocab_size: int | None = None
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    name: str

    def info(self) -> EngineInfo: ...

    def tokenize(self, text: str) -> list[int]: ...

    def render(self, request: GenerationRequest) -> str: ...

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...

    def stream(self, request: GenerationRequest) -> Iterator[TokenEvent]: ...

    def logprobs(self, texts: list[str]) -> list[Logprobs] | None: ...

    def close(self) -> None: ...


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (to hold back)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
