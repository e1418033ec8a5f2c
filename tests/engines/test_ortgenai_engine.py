"""The ort-genai engine on an fp32 ONNX export of the demo teacher: same greedy tokens as the torch engine
(batched and unbatched), chat rendering, seeded sampling, stop strings, streaming and logprobs.

Tolerance: logprobs equal the torch engine's within 1e-3 (absolute, per token).
"""

from __future__ import annotations

import math

import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.errors import BadInputError

pytest.importorskip("onnxruntime_genai")

PROMPTS = [
    "Where is my order ORD-12345?",
    "Hi, my coffee grinder arrived broken. Order #998877. This is urgent.",
    "Cancel it",
    "Does the yoga mat come with a warranty? I have been a customer for years and I tried the help page.",
]
CHATS = [[{"role": "user", "content": p}] for p in PROMPTS]


@pytest.fixture(scope="module")
def teacher():
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR

    return BUNDLED_TEACHER_DIR


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, teacher):
    from slmops.export.onnx import export_onnx

    return export_onnx(teacher, tmp_path_factory.mktemp("ort") / "teacher-fp32", precision="fp32").out_dir


@pytest.fixture(scope="module")
def engine(export_dir):
    return open_engine(export_dir, max_batch_size=3)


@pytest.fixture(scope="module")
def torch_engine(teacher):
    return open_engine(teacher)


def test_open_engine_picks_ort_genai(engine, export_dir):
    info = engine.info()
    assert engine.name == "ort-genai" and info.format == "onnx" and info.precision == "fp32"
    assert info.bytes_on_disk > 0 and info.parameters > 0 and info.vocab_size == 1024 and info.context_length == 512
    assert info.device == "cpu" and info.path == str(export_dir)


def test_tokenize_and_render_match_torch(engine, torch_engine):
    for p in PROMPTS + ["héllo wörld 😀 {\"a\": 1}"]:
        assert engine.tokenize(p) == torch_engine.tokenize(p)
    for chat in CHATS[:2]:
        req = GenerationRequest(messages=chat)
        assert engine.render(req) == torch_engine.render(req)


def test_greedy_matches_torch_unbatched_and_batched(engine, torch_engine):
    reqs = [GenerationRequest(messages=c, max_new_tokens=48) for c in CHATS]
    ref = torch_engine.generate(reqs)
    batched = engine.generate(reqs)  # max_batch_size=3: a batch of 3 and one of 1
    assert [r.token_ids for r in batched] == [r.token_ids for r in ref]
    assert [r.text for r in batched] == [r.text for r in ref]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in ref]
    single = [engine.generate([r])[0].token_ids for r in reqs]
    assert single == [r.token_ids for r in ref]
    assert batched[0].text.startswith('{"intent"')
    assert batched[0].prompt_tokens == len(engine.tokenize(engine.render(reqs[0])))


def test_max_new_tokens_and_timings(engine):
    res = engine.generate([GenerationRequest(messages=CHATS[1], max_new_tokens=5)])[0]
    assert res.completion_tokens == 5 and res.finish_reason == "length"
    assert 0 <= res.ttft_s <= res.latency_s


def test_seeded_sampling_is_reproducible_and_independent_of_batch(engine):
    def req(seed, prompt=PROMPTS[1]):
        return GenerationRequest(prompt=prompt, max_new_tokens=12, temperature=1.5, seed=seed)

    alone = engine.generate([req(7)])[0].token_ids
    assert engine.generate([req(7)])[0].token_ids == alone
    in_batch = engine.generate([req(8, PROMPTS[0]), req(7)])
    assert in_batch[1].token_ids == alone
    assert len({tuple(engine.generate([req(s)])[0].token_ids) for s in range(5)}) > 1


def test_top_k_one_equals_greedy(engine):
    greedy = engine.generate([GenerationRequest(messages=CHATS[2], max_new_tokens=10)])[0].token_ids
    k1 = engine.generate([GenerationRequest(messages=CHATS[2], max_new_tokens=10, temperature=0.7, top_k=1,
                                            seed=3)])[0].token_ids
    tiny_p = engine.generate([GenerationRequest(messages=CHATS[2], max_new_tokens=10, temperature=0.7, top_p=1e-6,
                                                seed=3)])[0].token_ids
    assert k1 == greedy == tiny_p


def test_stop_string_truncates_and_streams_identically(engine, torch_engine):
    full = engine.generate([GenerationRequest(messages=CHATS[0], max_new_tokens=48)])[0]
    stop = '"order_id"'
    assert stop in full.text
    req = GenerationRequest(messages=CHATS[0], max_new_tokens=48, stop=[stop])
    cut = engine.generate([req])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert cut.text == torch_engine.generate([req])[0].text
    events = list(engine.stream(req))
    assert "".join(e.text for e in events) == cut.text
    assert events[-1].finish_reason == "stop" and all(e.finish_reason is None for e in events[:-1])


def test_stream_equals_generate(engine):
    for chat in CHATS[:2]:
        req = GenerationRequest(messages=chat, max_new_tokens=40)
        events = list(engine.stream(req))
        res = engine.generate([req])[0]
        assert "".join(e.text for e in events) == res.text
        assert [e.token_id for e in events if e.token_id is not None][: res.completion_tokens] == res.token_ids
        assert events[-1].completion_tokens == res.completion_tokens
        assert all(e.logprob is None or e.logprob <= 0 for e in events)


def test_logprobs_match_torch(engine, torch_engine):
    texts = [engine.render(GenerationRequest(messages=c)) + '{"intent": "track_order"}' for c in CHATS[:2]]
    ours, ref = engine.logprobs(texts), torch_engine.logprobs(texts)
    for a, b in zip(ours, ref, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs[0] is None
        assert all(math.isclose(x, y, abs_tol=1e-3) for x, y in zip(a.logprobs[1:], b.logprobs[1:], strict=True))
    dist = engine.token_distributions(texts[:1])[0]
    assert dist.shape == (len(ours[0].token_ids), 1024)


def test_bad_requests_rejected(engine):
    with pytest.raises(BadInputError, match="no adapter named"):
        engine.generate([GenerationRequest(prompt="x", adapter="gifts")])
    with pytest.raises(BadInputError, match="context"):
        engine.generate([GenerationRequest(prompt="1 " * 600)])
    with pytest.raises(BadInputError, match="no swappable LoRA"):
        engine.load_adapter("a", __file__)  # an export without runtime adapters takes none


def test_not_an_export_folder(tmp_path):
    from slmops.engines.ortgenai_engine import OrtGenAIEngine

    with pytest.raises(BadInputError, match="genai_config.json"):
        OrtGenAIEngine(tmp_path)
