"""The engine worker process: the same tokens as the engine in-process, errors that cross the process
boundary as the same classes, batched events that keep their decode times, a crash that fails only the
requests in flight (and the model loads again), and the context fitting the server relies on."""

from __future__ import annotations

import os
import signal
import time

import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.engines.base import ContextLengthExceeded
from slmops.errors import BadInputError
from slmops.serve.manager import ModelSpec, ServedModel, use_worker_process
from slmops.serve.scheduler import Overloaded, Scheduler, fit_context
from slmops.serve.worker import EngineCrashed, EngineWorker, default_threads, pack_error, unpack_error

from ..support.collect import Collector

PROMPTS = ["Where is my order ORD-12345?", "Cancel it", "refund please, order 5"]


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = EngineWorker(str(tiny_model_dir), name="tiny", max_batch_size=4, max_queue=2, flush_interval_s=0.05)
    yield w
    w.close()


def test_worker_gives_the_engines_tokens_and_keeps_decode_times(worker, tiny_model_dir):
    engine = open_engine(tiny_model_dir)
    reqs = [GenerationRequest(prompt=p, max_new_tokens=12, stop=["\x00never"]) for p in PROMPTS]
    alone = [engine.generate([r])[0] for r in reqs]
    outs = [Collector() for _ in reqs]
    for r, out in zip(reqs, outs, strict=True):
        worker.submit(r, out)
    for out in outs:
        assert out.done.wait(60) and out.error is None
    assert [o.text for o in outs] == [a.text for a in alone]
    assert [o.events[-1].completion_tokens for o in outs] == [a.completion_tokens for a in alone]
    # with a 50 ms flush interval most events travel together, but each keeps the time it was decoded
    times = outs[0].times
    assert all(t is not None for t in times) and times == sorted(times)
    assert len(set(times)) == len(times), "every decode step has its own time"
    assert worker.engine.name == "torch" and worker.engine.info().context_length == engine.info().context_length
    assert worker.engine.tokenize(worker.engine.render(reqs[0])) == engine.tokenize(engine.render(reqs[0]))
    assert worker.engine.token_text(alone[0].token_ids[0]) == engine.tokenizer.decode([alone[0].token_ids[0]])
    assert worker.idle and worker.stats.completed >= 3


def test_errors_cross_the_process_boundary_as_the_same_classes(worker):
    with pytest.raises(BadInputError, match="adapter"):
        worker.submit(GenerationRequest(prompt="hi", adapter="ghost"), Collector())
    ctx = worker.engine.info().context_length
    with pytest.raises(ContextLengthExceeded) as exc:
        worker.submit(GenerationRequest(prompt="hi", max_new_tokens=ctx), Collector(), fit="strict")
    assert exc.value.param == "max_tokens"
    out = Collector()  # "clamp" shortens max_new_tokens to what the context leaves instead
    worker.submit(GenerationRequest(prompt="hi", max_new_tokens=ctx, stop=["\x00never"]), out, fit="clamp")
    assert out.done.wait(120) and out.error is None
    assert out.events[-1].prompt_tokens + out.events[-1].completion_tokens == ctx
    # a full queue: 4 running + 2 waiting, the next one is refused with a Retry-After
    outs = [Collector() for _ in range(6)]
    for o in outs:
        worker.submit(GenerationRequest(prompt="hi", max_new_tokens=200, stop=["\x00never"]), o)
    with pytest.raises(Overloaded) as over:
        worker.submit(GenerationRequest(prompt="hi"), Collector())
    assert over.value.retry_after >= 1
    for o in outs:
        assert o.done.wait(120)
    for packed in (Overloaded("full", retry_after=3.0), ContextLengthExceeded("long", param="prompt"),
                   RuntimeError("boom")):
        back = unpack_error(pack_error(packed))
        assert type(back).__name__ in (type(packed).__name__, "RuntimeError") and str(packed) in str(back)


def test_a_crashed_worker_fails_its_requests_and_the_model_loads_again(tiny_model_dir):
    served = ServedModel(ModelSpec(ref=str(tiny_model_dir), name="tiny"), max_batch_size=2)
    loaded = served.load()
    assert isinstance(loaded.scheduler, EngineWorker)
    out = Collector()
    loaded.scheduler.submit(GenerationRequest(prompt="hi", max_new_tokens=500, stop=["\x00never"]), out)
    time.sleep(0.3)
    os.kill(loaded.engine.pid, signal.SIGKILL)
    assert out.done.wait(30) and isinstance(out.error, EngineCrashed)
    with pytest.raises(EngineCrashed):
        loaded.scheduler.submit(GenerationRequest(prompt="hi"), Collector())
    again = served.load()  # a dead worker is replaced on the next load
    assert again is not loaded and again.engine.pid != loaded.engine.pid
    out = Collector()
    again.scheduler.submit(GenerationRequest(prompt="hi", max_new_tokens=3), out)
    assert out.done.wait(60) and out.error is None
    served.unload()
    assert served.loaded is None


def test_a_model_that_cannot_load_says_why(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Exception) as exc:
        EngineWorker(str(tmp_path), name="broken")
    assert "broken" in str(exc.value) or "config" in str(exc.value).lower() or "json" in str(exc.value).lower()


def test_which_models_get_a_worker_process(tiny_model_dir, tmp_path):
    assert use_worker_process(ModelSpec(ref=str(tiny_model_dir), name="a"))
    assert not use_worker_process(ModelSpec(ref=str(tiny_model_dir), name="a", isolation="thread"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert not use_worker_process(ModelSpec(ref=str(gguf), name="b"))
    assert use_worker_process(ModelSpec(ref=str(gguf), name="b", isolation="process"))
    assert not use_worker_process(ModelSpec(ref="http://127.0.0.1:1/v1", name="c"))
    with pytest.raises(BadInputError):
        use_worker_process(ModelSpec(ref=str(gguf), name="b", isolation="fork"))
    assert 1 <= default_threads() <= max(1, (os.cpu_count() or 1))


def test_fit_context_clamps_or_refuses(tiny_model_dir):
    engine = open_engine(tiny_model_dir)
    ctx = engine.info().context_length
    row = engine.prepare(GenerationRequest(prompt="hello there", max_new_tokens=ctx))
    n = len(row.prompt_ids)
    with pytest.raises(ContextLengthExceeded, match="do not fit"):
        fit_context(row, ctx, strict=True)
    fit_context(row, ctx, strict=False)
    assert row.request.max_new_tokens == ctx - n
    with pytest.raises(ContextLengthExceeded, match="the prompt is"):
        fit_context(row, n, strict=False)
    sched = Scheduler(engine, threaded=False)  # driven by its owner, no thread
    out = Collector()
    sched.submit(GenerationRequest(prompt="hello", max_new_tokens=3), out)
    while sched.busy:
        sched.run_once()
    assert out.done.is_set() and out.error is None and len(out.events) == 3
    sched.close()
