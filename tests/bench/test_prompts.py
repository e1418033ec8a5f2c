"""Benchmark prompts have about the asked number of tokens, counted by each model's own tokenizer."""

from __future__ import annotations

import pytest

from slmops.bench.prompts import build_prompt
from slmops.engines.base import GenerationRequest
from slmops.errors import SlmopsError


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from slmops.engines import open_engine

    e = open_engine(tiny_model_dir)
    yield e
    e.close()


@pytest.mark.parametrize("n", [32, 128, 300])
def test_prompt_has_about_n_tokens(engine, n):
    p = build_prompt(engine, n, max_new_tokens=16)
    req = p.request(16)
    counted = len(engine.tokenize(engine.render(req)))  # template included, as the model sees it
    assert counted == p.tokens
    assert n - 8 <= counted <= n  # as close as whole words allow, never over
    assert not p.capped
    assert req.messages[0]["role"] == "user" and req.max_new_tokens == 16 and req.temperature == 0


def test_offsets_give_different_text_of_the_same_length(engine):
    a, b = build_prompt(engine, 64, offset=0), build_prompt(engine, 64, offset=53)
    assert a.messages != b.messages
    assert abs(a.tokens - b.tokens) <= 8


def test_prompt_is_capped_to_the_context(engine):
    ctx = engine.info().context_length  # 512 for the tiny preset
    p = build_prompt(engine, ctx, max_new_tokens=64)
    assert p.capped and p.tokens <= ctx - 64 - 1
    assert p.target_tokens == ctx


class _Remote:
    """An engine that cannot tokenize (like openai-http): lengths are estimated."""

    def info(self):
        class I:  # noqa: E742
            context_length = None
        return I()

    def tokenize(self, text):
        raise SlmopsError("cannot tokenize")

    def render(self, request: GenerationRequest):
        raise SlmopsError("cannot render")


def test_remote_engines_get_an_estimate():
    p = build_prompt(_Remote(), 100)
    assert p.tokens is None
    assert 300 <= len(p.messages[0]["content"]) <= 400  # ~4 characters per token
