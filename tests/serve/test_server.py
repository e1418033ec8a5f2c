"""The server, started for real on 127.0.0.1 and used with the official `openai` client: chat and
completions, streaming or not, stop strings, max_tokens, n, seeds, usage, adapters, logprobs, every error
status, 429 under overload, keep-alive unload, capture, metrics."""

from __future__ import annotations

import json
import threading
import time

import httpx2 as httpx
import openai
import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.serve.manager import ModelSpec

PROMPT = "Where is my order ORD-12345?"


@pytest.fixture(scope="module")
def engine(tiny_model_dir, loras):
    return open_engine(tiny_model_dir, adapters={k: str(v) for k, v in loras.items()})


@pytest.fixture()
def server(start_server, tiny_model_dir, loras):
    spec = ModelSpec(ref=str(tiny_model_dir), name="tiny", adapters={k: str(v) for k, v in loras.items()})
    return start_server([spec], api_key="sekret")


def client(srv, key="sekret", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, **kw)


def chat_req(text=PROMPT, **kw) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kw)


def test_chat_matches_the_engine_and_counts_usage(server, engine):
    ref = engine.generate([chat_req(max_new_tokens=20)])[0]
    r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=20, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens
    assert r.usage.completion_tokens == ref.completion_tokens
    assert r.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens
    assert r.object == "chat.completion" and r.model == "tiny"


def test_chat_stream_equals_non_stream_and_reports_usage_last(server, engine):
    c = client(server)
    args = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0)
    whole = c.chat.completions.create(**args)
    chunks = list(c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completions_stream_and_echo(server, engine):
    ref = engine.generate([GenerationRequest(prompt="Cancel it", max_new_tokens=12)])[0]
    c = client(server)
    r = c.completions.create(model="tiny", prompt="Cancel it", max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == ref.completion_tokens
    parts = list(c.completions.create(model="tiny", prompt="Cancel it", max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == ref.text
    echo = c.completions.create(model="tiny", prompt="Cancel it", max_tokens=12, temperature=0, echo=True)
    assert echo.choices[0].text == "Cancel it" + ref.text
    two = c.completions.create(model="tiny", prompt=["Cancel it", PROMPT], max_tokens=5, temperature=0)
    assert [ch.index for ch in two.choices] == [0, 1] and two.choices[0].text == ref.text[: len(two.choices[0].text)]


def test_stop_strings_and_max_tokens(server, engine):
    full = engine.generate([chat_req(max_new_tokens=30)])[0].text
    assert len(full) > 6
    stop = full[3:6]
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=30,
                                  temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                  max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n_and_seed_reproducibility(server):
    c = client(server)
    args = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=1.0,
                n=3, seed=42)
    a, b = c.chat.completions.create(**args), c.chat.completions.create(**args)
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts == [ch.message.content for ch in b.choices]
    assert len(set(texts)) > 1, "each choice samples with its own seed"
    single = c.chat.completions.create(**{**args, "n": 1})
    assert single.usage.prompt_tokens == a.usage.prompt_tokens  # the prompt counts once


def test_adapters_per_request_without_reload(server, engine):
    c = client(server)
    outs = {}
    for model, adapter in [("tiny", None), ("tiny:gifts", "gifts"), ("subs", "subs"), ("tiny:base", "base")]:
        ref = engine.generate([chat_req(max_new_tokens=12, adapter=adapter)])[0].text
        got = c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
                                        temperature=0).choices[0].message.content
        assert got == ref, model
        outs[model] = got
    assert outs["tiny:gifts"] != outs["tiny"] and outs["subs"] != outs["tiny"]
    ids = [m.id for m in c.models.list().data]
    assert ids == ["tiny", "tiny:gifts", "tiny:subs"]


def test_different_adapters_in_flight_at_once(server, engine):
    c = client(server)
    refs = {m: engine.generate([chat_req(max_new_tokens=40, adapter=a)])[0].text
            for m, a in [("tiny:gifts", "gifts"), ("tiny:subs", "subs"), ("tiny", None)]}
    got = {}

    def run(model):
        got[model] = c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=40, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=run, args=(m,)) for m in refs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == refs


def test_logprobs(server, engine):
    r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens
    for it in items:
        assert it.logprob <= 0 and len(it.top_logprobs) == 2
        assert it.top_logprobs[0].logprob == pytest.approx(it.logprob, abs=1e-5)  # greedy = most likely


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(max_tokens=-1), 400, "max_tokens"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "assistant", "content": "hi"}]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]), 400, "messages.1.role"),
    (dict(messages=[{"role": "wizard", "content": "a"}]), 400, "messages.0.role"),
    (dict(temperature=5), 400, "temperature"),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (dict(messages=[{"role": "user", "content": "order " * 3000}]), 400, "messages"),
    (dict(max_tokens=100000), 400, "max_tokens"),
    (dict(model="nope"), 404, "model"),
    (dict(model="tiny:nope"), 404, "model"),
    (dict(model="../../etc/passwd"), 404, "model"),
])
def test_bad_requests_get_openai_errors(server, kwargs, status, param):
    args = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=4)
    args.update(kwargs)
    with pytest.raises(openai.APIStatusError) as err:
        client(server).chat.completions.create(**args)
    assert err.value.status_code == status
    body = err.value.body
    assert set(body) >= {"message", "type", "param", "code"} and body["param"] == param, body


def test_auth_body_limit_unknown_fields_and_openapi(start_server, tiny_model_dir):
    srv = start_server([ModelSpec(ref=str(tiny_model_dir), name="tiny")], api_key="sekret", max_body_bytes=4096)
    with pytest.raises(openai.AuthenticationError):
        client(srv, key="wrong").models.list()
    r = httpx.get(srv.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(srv.url + "/health").status_code == 200
    assert httpx.get(srv.url + "/ready").json()["status"] == "ready"
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 10000}]}
    r = httpx.post(srv.url + "/v1/chat/completions", json=big, headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 400
    ok = client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                             extra_body={"some_future_field": 1, "store": True})
    assert ok.choices[0].message.role == "assistant"
    spec = httpx.get(srv.url + "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/completions" in spec["paths"]
    assert httpx.get(srv.url + "/nowhere", headers={"Authorization": "Bearer sekret"}).json()["error"]["type"] == "not_found_error"


def test_overload_answers_429_with_retry_after(start_server, tiny_model_dir):
    srv = start_server([ModelSpec(ref=str(tiny_model_dir), name="tiny")], max_queue=1, max_batch_size=1)
    statuses, retry = [], []
    c = client(srv)

    def hit():
        try:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=60,
                                      stop=["\x00never"])
            statuses.append(200)
        except openai.RateLimitError as e:  # the openai client sees 429 as a RateLimitError
            statuses.append(e.status_code)
            retry.append(e.response.headers.get("retry-after"))
            assert e.body["type"] == "rate_limit_error"

    threads = [threading.Thread(target=hit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429} and all(r and int(r) >= 1 for r in retry)


def test_keep_alive_unloads_idle_models_and_reloads_on_demand(start_server, tiny_model_dir):
    srv = start_server([ModelSpec(ref=str(tiny_model_dir), name="tiny")], keep_alive_s=0.5)
    c = client(srv)
    c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    deadline = time.time() + 15
    while srv.manager.models["tiny"].loaded is not None and time.time() < deadline:
        time.sleep(0.1)
    assert srv.manager.models["tiny"].loaded is None
    assert "slmops_model_loaded{model=\"tiny\"} 0.0" in httpx.get(srv.url + "/metrics").text
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None
    r = httpx.post(srv.url + "/v1/models/unload", json={"model": "tiny"})
    assert r.status_code == 200 and srv.manager.models["tiny"].loaded is None
    r = httpx.post(srv.url + "/v1/models/load", json={"model": "tiny"})
    assert r.status_code == 200 and r.json()["loaded"] and srv.manager.models["tiny"].loaded is not None
    assert httpx.post(srv.url + "/v1/models/load", json={"model": "../x"}).status_code == 404


def test_client_disconnect_cancels_generation(start_server, tiny_model_dir):
    srv = start_server([ModelSpec(ref=str(tiny_model_dir), name="tiny")])
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "stop": ["\x00never"]}
    sched = srv.manager.models["tiny"].loaded.scheduler
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert sched.running == 1
    deadline = time.time() + 10
    while sched.running and time.time() < deadline:
        time.sleep(0.05)
    assert sched.running == 0 and sched.stats.cancelled >= 1


def test_metrics_and_capture(start_server, tiny_model_dir, tmp_path):
    from slmops.serve.capture import redact_pii

    cap = tmp_path / "capture.jsonl"
    srv = start_server([ModelSpec(ref=str(tiny_model_dir), name="tiny")], capture=cap, redact=redact_pii)
    c = client(srv)
    c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "mail me at a.b@example.com"}],
                              max_tokens=4)
    list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "call +1 555 123 4567"}],
                                   max_tokens=4, stream=True))
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}])
    rows = [json.loads(line) for line in cap.read_text().splitlines()]
    assert len(rows) == 2
    assert rows[0]["messages"][0] == {"role": "system", "content": "be brief"}
    assert rows[0]["messages"][1]["content"] == "mail me at [EMAIL]" and rows[1]["messages"][0]["content"] == "call [NUMBER]"
    assert rows[0]["messages"][-1]["role"] == "assistant"
    from slmops.data.formats import detect_format

    assert detect_format(rows) == "chat" and set(rows[0]) == {"messages", "metadata"}
    text = httpx.get(srv.url + "/metrics").text
    assert 'slmops_requests_total{adapter="-",endpoint="chat/completions",model="tiny",status="200"} 2.0' in text
    assert 'slmops_requests_total{adapter="-",endpoint="chat/completions",model="-",status="404"} 1.0' in text
    for name in ("slmops_time_to_first_token_seconds_count", "slmops_inter_token_latency_seconds_count",
                 "slmops_request_duration_seconds_count", "slmops_completion_tokens_total", "slmops_queue_depth",
                 "slmops_batch_size_count", "slmops_engine_memory_bytes"):
        assert name in text, name


def test_json_mode(server):
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=80,
                                  temperature=0, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                  response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}})
    assert err.value.body["param"] == "response_format"
