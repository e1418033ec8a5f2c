"""Benchmark prompts of a given length in tokens, from the demo task's customer messages.

Lengths are counted with each engine's own tokenizer on the prompt as the model sees it (the chat
template applied), so "128 tokens" means 128 tokens for every model, whatever its vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from slmops.engines.base import GenerationRequest
from slmops.errors import SlmopsError

CHARS_PER_TOKEN_ESTIMATE = 4  # for engines that cannot tokenize (remote servers)


@lru_cache(maxsize=4)
def text_pool(seed: int = 0, n: int = 600) -> tuple[str, ...]:
    """Words of `n` demo-task customer messages (deterministic by `seed`)."""
    from slmops.demo.task import generate

    return tuple(" ".join(ex.message for ex in generate(n, seed=seed)).split())


@dataclass
class BenchPrompt:
    messages: list[dict[str, str]] | None
    prompt: str | None
    target_tokens: int
    tokens: int | None  # counted with the engine's tokenizer (template included); None when it cannot count
    capped: bool = False  # the target did not fit the context with max_new_tokens and was lowered

    def request(self, max_new_tokens: int) -> GenerationRequest:
        return GenerationRequest(messages=self.messages, prompt=self.prompt, max_new_tokens=max_new_tokens,
                                 temperature=0.0)


def _count(engine, messages: list[dict[str, str]] | None, prompt: str | None) -> int:
    req = GenerationRequest(messages=messages, prompt=prompt, max_new_tokens=1)
    return len(engine.tokenize(engine.render(req)))


def can_tokenize(engine) -> bool:
    try:
        engine.tokenize("a")
        engine.render(GenerationRequest(prompt="a", max_new_tokens=1))
    except (SlmopsError, NotImplementedError):
        return False
    return True


def _uses_chat(engine) -> bool:
    try:
        engine.render(GenerationRequest(messages=[{"role": "user", "content": "a"}], max_new_tokens=1))
    except (SlmopsError, NotImplementedError):
        return False
    return True


def build_prompt(engine, n_tokens: int, *, offset: int = 0, max_new_tokens: int = 0, seed: int = 0) -> BenchPrompt:
    """A prompt of at most `n_tokens` tokens (as close as the words allow) for `engine`.

    The user message is demo-task text starting at word `offset` (so repeats can differ); it is rendered
    through the model's chat template (or used raw when the model has none) and measured with the model's
    tokenizer. When the model's context cannot hold `n_tokens + max_new_tokens`, the target is lowered to
    fit and `capped` is set. Engines that cannot tokenize (remote servers) get about 4 characters per token
    and `tokens=None`.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    words = text_pool(seed)
    offset = offset % max(1, len(words) // 2)
    target, capped = n_tokens, False
    ctx = None
    try:
        ctx = engine.info().context_length
    except Exception:  # noqa: BLE001 - info of a remote engine needs nothing, but be safe
        ctx = None
    if ctx and target + max_new_tokens >= ctx:
        target, capped = max(1, ctx - max_new_tokens - 1), True

    if not can_tokenize(engine):
        text, chars = [], 0
        for w in words[offset:]:
            if chars + len(w) + 1 > target * CHARS_PER_TOKEN_ESTIMATE and text:
                break
            text.append(w)
            chars += len(w) + 1
        return BenchPrompt(messages=[{"role": "user", "content": " ".join(text)}], prompt=None,
                           target_tokens=n_tokens, tokens=None, capped=capped)

    chat = _uses_chat(engine)

    def make(k: int) -> tuple[list[dict[str, str]] | None, str | None]:
        text = " ".join(words[offset:offset + k])
        return ([{"role": "user", "content": text}], None) if chat else (None, text)

    # binary search for the most words whose prompt fits in `target` tokens; every word is at least one
    # token, so more than `target` words never fit
    lo, hi = 1, max(1, min(len(words) - offset, target))
    if _count(engine, *make(1)) > target:
        hi = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(engine, *make(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    messages, prompt = make(lo)
    return BenchPrompt(messages=messages, prompt=prompt, target_tokens=n_tokens,
                       tokens=_count(engine, messages, prompt), capped=capped)
