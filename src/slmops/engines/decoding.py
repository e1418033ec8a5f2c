"""Pieces of the decode loop that every local engine (torch, ort-genai, llama.cpp) shares: turning a row's
progress into streamed events and a result, and numpy log-softmax / sampling for the engines whose runtime
hands back numpy logits. A "row" is an engine's per-request state with ``request``, ``prompt_ids``, ``ids``,
``logprobs``, ``text``, ``emitted``, ``finish_reason``, ``t_first``, ``t_last`` (and ``rng`` for sampling).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from slmops.engines.base import GenerationRequest, GenerationResult, TokenEvent, stop_holdback


@dataclass
class Row:
    """One request's decoding state inside an engine. `rng` is the engine's sampler state (a numpy Generator,
    or a torch Generator for the torch engine), None for greedy."""

    request: GenerationRequest
    prompt_ids: list[int]
    rng: Any = None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when top_logprobs > 0
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    t_first: float | None = None
    t_last: float | None = None


def row_result(row: Any, t0: float) -> GenerationResult:
    """The finished row as a GenerationResult; times relative to `t0` (when its batch started)."""
    return GenerationResult(
        text=row.text, token_ids=list(row.ids), finish_reason=row.finish_reason or "length",
        prompt_tokens=len(row.prompt_ids), completion_tokens=len(row.ids),
        ttft_s=(row.t_first or t0) - t0, latency_s=(row.t_last or t0) - t0,
    )


def step_event(row: Row) -> TokenEvent:
    """The event for `row`'s latest decode step: the text that can no longer be cut by a stop string (nor
    end inside a multi-byte character) and was not emitted before, and the step's token and logprob."""
    stops = row.request.stop
    safe = len(row.text) if row.finish_reason else len(row.text) - stop_holdback(row.text, stops)
    if row.text.endswith("\ufffd") and not row.finish_reason:
        safe = min(safe, len(row.text) - 1)
    delta = row.text[row.emitted:safe] if safe > row.emitted else ""
    row.emitted = max(row.emitted, safe)
    return TokenEvent(
        token_id=row.ids[-1] if row.ids else None, text=delta,
        logprob=row.logprobs[-1] if row.logprobs else None, finish_reason=row.finish_reason,
        prompt_tokens=len(row.prompt_ids), completion_tokens=len(row.ids),
        top_logprobs=row.top[-1] if row.top else None,
    )


def stream_events(row: Row, steps: Iterable[None]) -> Iterator[TokenEvent]:
    """One TokenEvent per decode step of `steps` (which advances `row`), see `step_event`."""
    for _ in steps:
        event = step_event(row)
        yield event
        if row.finish_reason:
            return


def json_allowed(row: Row, logits, piece, is_eos, candidates: int = 1024) -> list[int]:
    """For a JSON-mode row: the tokens (among the `candidates` best by `logits`, a 1-D numpy array) that keep
    its text a valid JSON-object prefix (see `engines.constraints`)."""
    import numpy as np

    from slmops.engines.constraints import allowed_tokens

    k = min(candidates, logits.size)
    best = np.argpartition(-logits, k - 1)[:k]
    ranked = best[np.argsort(-logits[best], kind="stable")]
    return allowed_tokens(row.text, (int(t) for t in ranked), piece, is_eos)


class JsonMode:
    """Mixin for engines: JSON-mode token filtering (see `engines.constraints`). The engine defines
    `_decode_one(token_id) -> str` (one token's text) and `_is_eos(token_id) -> bool`."""

    def _decode_one(self, token_id: int) -> str:  # pragma: no cover - each engine defines it
        raise NotImplementedError

    def _is_eos(self, token_id: int) -> bool:  # pragma: no cover - each engine defines it
        raise NotImplementedError

    def _piece(self, token_id: int) -> str:
        """One token's text, memoised (JSON mode checks many candidates per step)."""
        pieces = self.__dict__.setdefault("_pieces", {})
        if token_id not in pieces:
            pieces[token_id] = self._decode_one(token_id)
        return pieces[token_id]

    def _allowed(self, row: Row, logits) -> list[int] | None:
        """JSON mode: the tokens (numpy `logits` ranked) that keep the row a valid JSON-object prefix; None
        when the request is not in JSON mode."""
        return json_allowed(row, logits, self._piece, self._is_eos) if row.request.json_mode else None


def json_done(row: Row) -> bool:
    """True when a JSON-mode row's text is one complete JSON object (the answer ends there)."""
    from slmops.engines.constraints import COMPLETE, json_prefix_state

    return row.request.json_mode and json_prefix_state(row.text) == COMPLETE


def generate_batched(engine: Any, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Every request through the engine's `decode_batch`, in batches of `engine.max_batch_size` (grouped by
    adapter, then by prompt length; results in request order). Unknown adapters and bad prompts fail before
    any work."""
    import time

    adapters = [engine.resolve_adapter(r.adapter) for r in requests]
    rows = [engine.prepare(r) for r in requests]
    results: list[GenerationResult | None] = [None] * len(rows)
    for name, members in group_by_adapter(adapters).items():
        order = sorted(members, key=lambda i: len(rows[i].prompt_ids))
        for start in range(0, len(order), engine.max_batch_size):
            chunk = order[start:start + engine.max_batch_size]
            t0 = time.perf_counter()
            for _ in engine.decode_batch([rows[i] for i in chunk], name):
                pass
            for i in chunk:
                results[i] = row_result(rows[i], t0)
    return results  # type: ignore[return-value]


def stream_request(engine: Any, request: GenerationRequest) -> Iterator[TokenEvent]:
    """One request through the engine's `decode_batch`, as one TokenEvent per decode step."""
    adapter = engine.resolve_adapter(request.adapter)
    row = engine.prepare(request)
    yield from stream_events(row, engine.decode_batch([row], adapter))


def group_by_adapter(adapters: list[str | None]) -> dict[str | None, list[int]]:
    """Request indices grouped by resolved adapter name, in first-seen order."""
    groups: dict[str | None, list[int]] = {}
    for i, name in enumerate(adapters):
        groups.setdefault(name, []).append(i)
    return groups


def log_softmax(x):
    """Log-softmax over the last axis of a numpy array, in float64."""
    import numpy as np

    x = x.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def penalty_counts(request: GenerationRequest, generated: list[int]) -> dict[int, int] | None:
    """token -> times generated, when the request has a presence or frequency penalty (else None)."""
    if not (request.presence_penalty or request.frequency_penalty) or not generated:
        return None
    counts: dict[int, int] = {}
    for t in generated:
        counts[t] = counts.get(t, 0) + 1
    return counts


def pick_token(request: GenerationRequest, logits, rng, generated: list[int] | None = None,
               top: list | None = None, allowed: list[int] | None = None) -> tuple[int, float]:
    """(token, its log-probability) from numpy `logits`: greedy at temperature 0, else temperature, top-k and
    top-p sampling with the row's numpy Generator `rng` (reproducible per request seed). OpenAI's presence and
    frequency penalties are applied against `generated` (the tokens so far). With `request.top_logprobs`,
    the most likely (token, logprob) pairs are appended to `top`. Log-probabilities are the model's own,
    before penalties and temperature. `allowed` restricts the choice to those tokens (JSON mode)."""
    import numpy as np

    logp = log_softmax(logits)
    if top is not None and request.top_logprobs:
        k = min(request.top_logprobs, logp.size)
        best = np.argpartition(-logp, k - 1)[:k]
        best = best[np.argsort(-logp[best], kind="stable")]
        top.append([(int(t), float(logp[t])) for t in best])
    counts = penalty_counts(request, generated or [])
    if counts:
        logits = logits.astype(np.float64, copy=True)
        for t, c in counts.items():
            logits[t] -= request.presence_penalty + request.frequency_penalty * c
    if allowed is not None:
        masked = np.full(logits.shape, -np.inf, dtype=np.float64)
        masked[allowed] = logits[allowed]
        logits = masked
    if request.temperature == 0:
        tok = int(np.argmax(logits))
        return tok, float(logp[tok])
    scores = logits.astype(np.float64) / request.temperature
    if request.top_k and request.top_k > 0 and request.top_k < scores.size:
        kth = np.partition(scores, -request.top_k)[-request.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if request.top_p < 1.0:
        order = np.argsort(-scores, kind="stable")
        sorted_scores = scores[order]
        p = np.exp(sorted_scores - sorted_scores[0])
        p /= p.sum()
        drop = np.cumsum(p) - p >= request.top_p  # keep the token that crosses top_p
        sorted_scores = np.where(drop, -np.inf, sorted_scores)
        scores = np.empty_like(scores)
        scores[order] = sorted_scores
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    tok = int(rng.choice(probs.size, p=probs))
    return tok, float(logp[tok])


__all__ = ["JsonMode", "Row", "generate_batched", "group_by_adapter", "json_allowed", "json_done", "log_softmax", "penalty_counts", "pick_token", "row_result", "step_event",
           "stream_events", "stream_request"]
