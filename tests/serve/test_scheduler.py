"""The scheduler: continuous batching gives each request the tokens it gets alone, a full queue is refused,
cancellation and timeouts free the slot, shutdown answers every waiting request."""

from __future__ import annotations

import time

import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.serve.scheduler import Overloaded, RequestTimeout, Scheduler, ShuttingDown

from ..support.collect import Collector

PROMPTS = ["Where is my order ORD-12345?", "Cancel it", "refund please, order 5", "Hi, my grinder arrived broken."]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return open_engine(tiny_model_dir)


def test_concurrent_requests_match_single_runs_and_batch(engine):
    reqs = [GenerationRequest(prompt=p, max_new_tokens=n) for p, n in zip(PROMPTS * 3, range(4, 16), strict=True)]
    alone = [engine.generate([r])[0] for r in reqs]
    sizes = []
    sched = Scheduler(engine, max_batch_size=8, max_queue=32, on_batch=sizes.append)
    try:
        outs = [Collector() for _ in reqs]
        for r, c in zip(reqs, outs, strict=True):
            sched.submit(r, c)
        for c in outs:
            assert c.done.wait(60) and c.error is None
        assert [c.text for c in outs] == [a.text for a in alone]
        assert [c.events[-1].completion_tokens for c in outs] == [a.completion_tokens for a in alone]
        assert [c.events[-1].finish_reason for c in outs] == [a.finish_reason for a in alone]
        assert max(sizes) > 1, "requests were batched"
        assert max(sizes) <= 8
    finally:
        sched.close()


def test_full_queue_is_refused_with_retry_after(engine):
    sched = Scheduler(engine, max_batch_size=1, max_queue=2)
    try:
        cs = []
        with pytest.raises(Overloaded) as err:
            for _ in range(10):
                c = Collector()
                sched.submit(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=30), c)
                cs.append(c)
        assert err.value.retry_after >= 1
        assert 2 <= len(cs) <= 4
        for c in cs:
            assert c.done.wait(60) and c.error is None
    finally:
        sched.close()


def test_cancel_and_timeout(engine):
    sched = Scheduler(engine, max_batch_size=4, max_queue=8)
    try:
        c1, c2 = Collector(), Collector()
        t1 = sched.submit(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=200, stop=["\x00never"]), c1)
        sched.submit(GenerationRequest(prompt=PROMPTS[1], max_new_tokens=200), c2, timeout=0.0001)
        time.sleep(0.05)
        t1.cancel()
        assert c2.done.wait(30) and isinstance(c2.error, RequestTimeout)
        deadline = time.time() + 10
        while sched.running and time.time() < deadline:
            time.sleep(0.01)
        assert sched.running == 0 and sched.idle
        assert not c1.done.is_set()  # a cancelled request gets nothing more
    finally:
        sched.close()


def test_close_answers_waiting_requests_and_refuses_new(engine):
    sched = Scheduler(engine, max_batch_size=1, max_queue=8)
    cs = [Collector() for _ in range(3)]
    for c in cs:
        sched.submit(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=200), c)
    sched.close(grace_s=0)
    for c in cs:
        assert c.done.wait(30)
    assert any(isinstance(c.error, ShuttingDown) for c in cs)
    with pytest.raises(ShuttingDown):
        sched.submit(GenerationRequest(prompt=PROMPTS[0]), Collector())


def test_static_batching_path(engine):
    sched = Scheduler(engine, max_batch_size=4, max_queue=8, continuous=False)
    try:
        reqs = [GenerationRequest(prompt=p, max_new_tokens=8) for p in PROMPTS]
        outs = [Collector() for _ in reqs]
        for r, c in zip(reqs, outs, strict=True):
            sched.submit(r, c)
        for c in outs:
            assert c.done.wait(60) and c.error is None
        assert [c.text for c in outs] == [engine.generate([r])[0].text for r in reqs]
    finally:
        sched.close()
