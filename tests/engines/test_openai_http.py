"""The openai-http engine against the fake OpenAI-compatible server (tests/support/fake_openai.py, run in a
subprocess on 127.0.0.1): retries, non-retryable errors, concurrency, rate limit, streaming, auth."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import time
from pathlib import Path

import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.engines.openai_http import OpenAIHTTPEngine, RemoteError, split_base_url
from slmops.errors import SlmopsError

_spec = importlib.util.spec_from_file_location(
    "fake_openai", Path(__file__).resolve().parents[1] / "support" / "fake_openai.py")
fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake)


def chat(text: str, **kw) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture()
def server():
    servers = []

    def start(**opts):
        srv = fake.FakeServer(**opts).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.kill()


def test_base_url_forms_and_model_discovery(server):
    assert split_base_url("http://h:8000") == ("http://h:8000/v1", None)
    assert split_base_url("http://h:8000/v1/") == ("http://h:8000/v1", None)
    assert split_base_url("https://h/v1/chat/completions#qwen") == ("https://h/v1", "qwen")
    srv = server()
    root = srv.url[: -len("/v1")]
    eng = open_engine(root)  # no /v1: added
    assert isinstance(eng, OpenAIHTTPEngine) and eng.base_url == srv.url
    assert eng.model == "fake-teacher"  # first id from GET /v1/models
    info = eng.info()
    assert info.name == "openai-http" and info.format == "remote" and info.extra["model"] == "fake-teacher"
    assert eng.logprobs(["x"]) is None
    with pytest.raises(SlmopsError, match="cannot tokenize"):
        eng.tokenize("hello")
    assert OpenAIHTTPEngine(srv.url + "#other").model == "other"


def test_chat_and_completions_results(server):
    srv = server()
    eng = OpenAIHTTPEngine(srv.url)
    res = eng.generate([chat("Where is my order?"), GenerationRequest(prompt="raw text", max_new_tokens=5)])
    assert res[0].text == fake.answer_for([{"role": "user", "content": "Where is my order?"}])
    assert res[0].finish_reason == "stop" and res[0].completion_tokens == len(res[0].text)
    assert res[0].prompt_tokens > 0 and res[0].latency_s > 0 and res[0].attempts == 1
    assert res[1].text == fake.answer_for("raw text")[:5] and res[1].finish_reason == "length"


def test_retries_until_success_on_flaky_server(server):
    # every distinct request fails twice (one of 429 / 500 / dropped connection), then succeeds
    srv = server(fail_first=2, fail_modes="429,500,drop", seed=1)
    eng = OpenAIHTTPEngine(srv.url, max_retries=3, backoff_base=0.01, backoff_max=0.05)
    reqs = [chat(f"question {i}") for i in range(6)]
    res = eng.generate(reqs)
    assert [r.text for r in res] == [fake.answer_for(r.messages) for r in reqs]
    assert all(r.attempts == 3 for r in res)
    assert srv.stats()["requests"] == 18


def test_gives_up_after_max_retries_and_settles(server):
    srv = server(fail_rate=1.0, fail_modes="500")
    eng = OpenAIHTTPEngine(srv.url, max_retries=2, backoff_base=0.01, backoff_max=0.02)
    out = eng.generate_settled([chat("a"), chat("b")])
    assert all(isinstance(r, RemoteError) for r in out)
    assert out[0].kind == "http-500" and out[0].attempts == 3 and "injected failure" in str(out[0])
    assert out[0].summary == "http-500: injected failure"
    assert srv.stats()["requests"] == 6
    with pytest.raises(RemoteError, match="gave up after 3 attempts"):
        eng.generate([chat("c")])


def test_non_retryable_400_surfaces_server_message(server):
    srv = server()
    eng = OpenAIHTTPEngine(srv.url, model="no-such-model", max_retries=5, backoff_base=0.01)
    with pytest.raises(RemoteError) as err:
        eng.generate([chat("hello")])
    assert err.value.status == 400 and err.value.attempts == 1
    assert "The model `no-such-model` does not exist." in str(err.value)
    assert srv.stats()["requests"] == 1  # not retried


def test_settled_keeps_successes_beside_failures(server):
    srv = server()
    eng = OpenAIHTTPEngine(srv.url, max_retries=0)
    out = eng.generate_settled([chat("ok"), chat("too long", max_new_tokens=1), chat("ok 2")])
    assert not any(isinstance(r, Exception) for r in out)
    bad = OpenAIHTTPEngine(srv.url, model="nope", max_retries=0)
    mixed = [bad.generate_settled([chat("x")])[0], *eng.generate_settled([chat("y")])]
    assert isinstance(mixed[0], RemoteError) and mixed[1].text


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = OpenAIHTTPEngine(f"http://127.0.0.1:{port}", model="m", max_retries=2, backoff_base=0.01)
    (res,) = eng.generate_settled([chat("x")])
    assert isinstance(res, RemoteError) and res.kind == "connection" and res.attempts == 3
    assert "server running" in (res.hint or "")


def test_concurrency_overlaps_requests(server):
    srv = server(latency=0.2)
    eng = OpenAIHTTPEngine(srv.url, concurrency=8, max_retries=0)
    eng.generate([chat("warm up")])
    t0 = time.perf_counter()
    res = eng.generate([chat(f"q{i}") for i in range(16)])
    elapsed = time.perf_counter() - t0
    assert len(res) == 16
    assert elapsed < 16 * 0.2 / 2, elapsed  # sequential would take 3.2 s; 8 at a time about 0.4 s
    assert 4 <= srv.stats()["max_inflight"] <= 8  # overlapping, never above the limit


def test_concurrency_one_is_sequential(server):
    srv = server(latency=0.05)
    eng = OpenAIHTTPEngine(srv.url, concurrency=1, max_retries=0)
    eng.generate([chat(f"q{i}") for i in range(5)])
    assert srv.stats()["max_inflight"] == 1


def test_rate_limit_is_respected(server):
    srv = server()
    eng = OpenAIHTTPEngine(srv.url, concurrency=8, max_rps=10, max_retries=0)
    eng.generate([chat(f"q{i}") for i in range(10)])
    arrivals = sorted(srv.stats()["arrivals"])
    assert arrivals[-1] - arrivals[0] >= 0.8  # 10 requests at 10/s: 9 gaps of 0.1 s
    for i in range(len(arrivals)):  # never more than 4 in any 0.3 s window (a burst would put 8 in one)
        assert sum(1 for t in arrivals[i:] if t - arrivals[i] < 0.3) <= 4


def test_retry_after_is_honoured(server):
    srv = server(fail_first=1, fail_modes="429", retry_after=0.6)
    eng = OpenAIHTTPEngine(srv.url, max_retries=2, backoff_base=0.0)
    t0 = time.perf_counter()
    (res,) = eng.generate([chat("x")])
    assert res.attempts == 2 and time.perf_counter() - t0 >= 0.6


def test_streaming_chat_and_completions(server):
    srv = server()
    eng = OpenAIHTTPEngine(srv.url)
    req = chat("Stream me please")
    events = list(eng.stream(req))
    assert len(events) > 3
    assert "".join(e.text for e in events) == fake.answer_for(req.messages)
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == len(fake.answer_for(req.messages))
    events = list(eng.stream(GenerationRequest(prompt="raw", max_new_tokens=6)))
    assert "".join(e.text for e in events) == fake.answer_for("raw")[:6]
    assert events[-1].finish_reason == "length"


def test_streaming_retries_before_first_event(server):
    srv = server(fail_first=2, fail_modes="500,429")
    eng = OpenAIHTTPEngine(srv.url, max_retries=2, backoff_base=0.01)
    req = chat("again")
    assert "".join(e.text for e in eng.stream(req)) == fake.answer_for(req.messages)


def test_api_key_from_argument_or_environment(server, monkeypatch):
    srv = server(api_key="s3cret")
    monkeypatch.delenv("SLMOPS_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RemoteError) as err:
        OpenAIHTTPEngine(srv.url, max_retries=3).generate([chat("x")])
    assert err.value.status == 401 and err.value.attempts == 1 and "--api-key" in err.value.hint
    assert OpenAIHTTPEngine(srv.url, api_key="s3cret").generate([chat("x")])[0].text
    monkeypatch.setenv("SLMOPS_API_KEY", "s3cret")
    eng = OpenAIHTTPEngine(srv.url)
    assert eng.generate([chat("x")])[0].text
    assert "s3cret" not in repr(eng)


def test_works_from_inside_a_running_event_loop(server):
    srv = server()
    eng = OpenAIHTTPEngine(srv.url)

    async def handler():  # e.g. an async web handler calling the sync API
        return eng.generate([chat("from async")])

    (res,) = asyncio.run(handler())
    assert json.loads(res.text)["echo"] == "from async"


def test_iter_settled_is_lazy_and_yields_in_completion_order(server):
    srv = server(latency=0.05)
    eng = OpenAIHTTPEngine(srv.url, concurrency=2)
    taken = []

    def requests():
        for i in range(20):
            taken.append(i)
            yield chat(f"q{i}")

    it = eng.iter_settled(requests())
    first = next(it)
    assert first[0] in range(20) and not isinstance(first[1], Exception)
    assert len(taken) < 20  # the iterable is consumed a window at a time
    it.close()
    assert srv.stats()["requests"] < 20
