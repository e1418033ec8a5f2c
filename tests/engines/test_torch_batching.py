"""Continuous batching in the torch engine: rows that join a running batch between decode steps, and rows
that leave it, get exactly the tokens they get alone; penalties and top logprobs."""

from __future__ import annotations

import math

import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.engines.decoding import pick_token

PROMPTS = [
    "Where is my order ORD-12345?",
    "Hi, my coffee grinder arrived broken. Order #998877. This is urgent.",
    "Cancel it",
    "Does the yoga mat come with a warranty? I have been a customer for years and I tried the help page.",
    "refund",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return open_engine(tiny_model_dir)


def _alone(engine, req):
    return engine.generate([req])[0].token_ids


def test_rows_joining_and_leaving_match_single_runs(engine):
    reqs = [GenerationRequest(prompt=p, max_new_tokens=n) for p, n in zip(PROMPTS, [12, 5, 20, 9, 14], strict=True)]
    expected = [_alone(engine, r) for r in reqs]
    batch = engine.open_batch(None)
    rows = [engine.prepare(r) for r in reqs]
    batch.admit(rows[:2])
    steps = 0
    pending = rows[2:]
    while batch.rows or pending:
        if steps in (2, 4) and pending:  # join mid-flight, one and then two at a time
            batch.admit(pending[:1] if steps == 2 else pending)
            pending = pending[1:] if steps == 2 else []
        batch.drop([r for r in batch.rows if r.finish_reason])
        if batch.rows:
            batch.step()
        steps += 1
        assert steps < 100
    assert [r.ids for r in rows] == expected
    assert all(r.finish_reason for r in rows)


def test_cancelled_rows_leave_without_disturbing_others(engine):
    reqs = [GenerationRequest(prompt=p, max_new_tokens=10) for p in PROMPTS[:3]]
    expected = [_alone(engine, r) for r in reqs]
    batch = engine.open_batch(None)
    rows = [engine.prepare(r) for r in reqs]
    batch.admit(rows)
    batch.step()
    batch.drop([rows[1]])  # a client went away
    assert len(batch) == 2
    while batch.rows:
        batch.drop([r for r in batch.rows if r.finish_reason])
        batch.step()
    assert rows[0].ids == expected[0] and rows[2].ids == expected[2]
    assert rows[1].finish_reason is None and rows[1].ids == expected[1][:2]


def test_seeded_sampling_in_a_continuous_batch_is_reproducible(engine):
    req = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=7)
    alone = _alone(engine, req)
    batch = engine.open_batch(None)
    other = engine.prepare(GenerationRequest(prompt=PROMPTS[1], max_new_tokens=30, temperature=1.0, seed=1))
    batch.admit([other])
    batch.step()
    row = engine.prepare(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=7))
    batch.admit([row])
    while not row.finish_reason:
        batch.step()
    assert row.ids == alone


def test_frequency_penalty_stops_repetition(engine):
    plain = engine.generate([GenerationRequest(prompt="Cancel it", max_new_tokens=24)])[0].token_ids
    assert len(set(plain)) < len(plain), "the tiny model repeats itself greedily (premise of the test)"
    pen = engine.generate([GenerationRequest(prompt="Cancel it", max_new_tokens=24, frequency_penalty=2.0,
                                             presence_penalty=2.0)])[0].token_ids
    assert pen != plain
    assert len(set(pen)) / len(pen) > len(set(plain)) / len(plain)


def test_top_logprobs_are_sorted_and_include_greedy_choice(engine):
    events = list(engine.stream(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=6, top_logprobs=3)))
    with_tokens = [e for e in events if e.token_id is not None and e.top_logprobs]
    assert with_tokens
    for e in with_tokens:
        assert len(e.top_logprobs) == 3
        lps = [lp for _, lp in e.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert e.top_logprobs[0][0] == e.token_id and math.isclose(e.top_logprobs[0][1], e.logprob, abs_tol=1e-5)


def test_numpy_pick_token_penalties_and_top():
    import numpy as np

    logits = np.array([3.0, 2.9, 0.0, -1.0], dtype=np.float32)
    req = GenerationRequest(prompt="x", presence_penalty=0.5, top_logprobs=2)
    top: list = []
    tok, lp = pick_token(req, logits, None, generated=[0], top=top)
    assert tok == 1  # token 0 was penalised below token 1
    assert [t for t, _ in top[0]] == [0, 1]
    assert lp == pytest.approx(float(logits[1] - np.log(np.exp(logits).sum())), abs=1e-6)
