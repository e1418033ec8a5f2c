"""The llama.cpp engine on GGUF exports (needs llama-cpp-python and llama.cpp's converter: `make llama-cpp`).

Tolerance, f16 GGUF vs torch fp32 on the tiny random model: every next-token log-probability within 0.01
(measured: 4e-4), mean KL below 1e-5, top-1 identical. On the trained demo teacher f16, greedy answers are
identical to the torch engine's."""

from __future__ import annotations

import numpy as np
import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.errors import BadInputError
from slmops.export import llamacpp

_WHY = llamacpp.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

TEXTS = ["Hello, my order 12345 has not arrived yet.", '{"intent": "refund", "order_id": "98765"}',
         "  two  spaces and 3.14"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir):
    from slmops.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    export_gguf(tiny_model_dir, out, quant="f16", measure=False, modelfile=False)
    return out


@pytest.fixture(scope="module")
def engines(tiny_gguf, tiny_model_dir):
    from slmops.engines.torch_engine import TorchEngine

    llama = open_engine(tiny_gguf)
    torch_engine = TorchEngine(tiny_model_dir)
    yield llama, torch_engine
    llama.close()


@pytest.fixture(scope="module")
def teacher_gguf(tmp_path_factory):
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR
    from slmops.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "teacher-f16.gguf"
    export_gguf(BUNDLED_TEACHER_DIR, out, quant="f16", measure=False, modelfile=False)
    return out


def test_f16_logits_match_torch(engines):
    llama, torch_engine = engines
    assert llama.name == "llama.cpp"
    for a, b in zip(llama.token_distributions(TEXTS), torch_engine.token_distributions(TEXTS), strict=True):
        assert a.shape == b.shape and a.dtype == np.float32
        assert np.abs(a - b).max() < 0.01
        kl = (np.exp(b) * (b - a)).sum(-1).mean()
        assert abs(kl) < 1e-5
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_tokenize_render_and_info(engines, tiny_gguf):
    llama, torch_engine = engines
    from slmops.demo.task import generate

    for ex in generate(20, seed=3):
        assert llama.tokenize(ex.message) == torch_engine.tokenize(ex.message)
        assert llama.tokenize(ex.answer_text) == torch_engine.tokenize(ex.answer_text)
    req = GenerationRequest(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 42"}])
    assert llama.render(req) == torch_engine.render(req)  # from the GGUF's own chat template
    assert "{% generation %}" not in llama.info().chat_template  # stripped for llama.cpp's Jinja engines
    info = llama.info()
    assert (info.format, info.precision, info.vocab_size) == ("gguf", "f16", 300)
    assert info.bytes_on_disk == tiny_gguf.stat().st_size and info.parameters > 50_000
    assert info.context_length == 512 and info.extra["pre_tokenizer"] == "gpt-2"


def test_logprobs_agree_with_distributions_and_torch(engines):
    llama, torch_engine = engines
    lp = llama.logprobs(TEXTS)
    ref = torch_engine.logprobs(TEXTS)
    for mine, theirs, dist in zip(lp, ref, llama.token_distributions(TEXTS), strict=True):
        assert mine.token_ids == theirs.token_ids and mine.tokens == theirs.tokens
        assert mine.logprobs[0] is None
        for i, v in enumerate(mine.logprobs[1:], start=1):
            assert v == pytest.approx(float(dist[i - 1, mine.token_ids[i]]), abs=1e-4)
            assert v == pytest.approx(theirs.logprobs[i], abs=0.01)


def test_sampling_seeds_streaming_and_stops(engines):
    llama, _ = engines
    msgs = [{"role": "user", "content": "Where is order 123?"}]
    a = llama.generate([GenerationRequest(messages=msgs, temperature=1.0, seed=7, max_new_tokens=12)])[0]
    b, c = llama.generate([GenerationRequest(messages=msgs, temperature=1.0, seed=8, max_new_tokens=12),
                           GenerationRequest(messages=msgs, temperature=1.0, seed=7, max_new_tokens=12)])
    assert a.token_ids == c.token_ids and a.token_ids != b.token_ids
    assert a.completion_tokens == len(a.token_ids) <= 12 and a.latency_s >= a.ttft_s >= 0
    greedy = GenerationRequest(messages=msgs, max_new_tokens=10)
    res = llama.generate([greedy])[0]
    events = list(llama.stream(greedy))
    assert "".join(e.text for e in events) == res.text
    assert [e.token_id for e in events if e.finish_reason is None] == res.token_ids[: len(events) - 1]
    assert events[-1].finish_reason == res.finish_reason
    top = llama.generate([GenerationRequest(prompt="Hello", temperature=0.7, top_k=5, top_p=0.9, seed=1,
                                            max_new_tokens=6)])[0]
    assert 1 <= top.completion_tokens <= 6
    if len(res.text) > 2:  # a stop string cuts the text before it
        stop = res.text[1:3]
        cut = llama.generate([GenerationRequest(messages=msgs, max_new_tokens=10, stop=[stop])])[0]
        assert cut.finish_reason == "stop" and stop not in cut.text and res.text.startswith(cut.text)


def test_interleaved_streams_equal_separate_runs(engines):
    llama, _ = engines
    r1 = GenerationRequest(prompt="Order 555 for", max_new_tokens=6)
    r2 = GenerationRequest(prompt="Refund please", max_new_tokens=6)
    want = [r.token_ids for r in llama.generate([r1, r2])]
    s1, s2 = llama.stream(r1), llama.stream(r2)
    got: list[list[int]] = [[], []]
    for e1, e2 in zip(s1, s2, strict=False):
        for k, e in enumerate((e1, e2)):
            if e.finish_reason is None or e.finish_reason == "length":
                got[k].append(e.token_id)
    assert [g[: len(w)] for g, w in zip(got, want, strict=True)] == want


def test_greedy_answers_match_torch_on_the_demo_teacher(teacher_gguf):
    from slmops.demo.task import generate
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR
    from slmops.engines.torch_engine import TorchEngine

    reqs = [GenerationRequest(messages=[{"role": "user", "content": ex.message}], max_new_tokens=64)
            for ex in generate(6, seed=5)]
    llama = open_engine(teacher_gguf)
    try:
        mine = llama.generate(reqs)
    finally:
        llama.close()
    ref = TorchEngine(BUNDLED_TEACHER_DIR).generate(reqs)
    assert [r.text for r in mine] == [r.text for r in ref]
    assert all(r.finish_reason == "stop" for r in mine)
    assert mine[0].text.startswith("{")


def test_bad_inputs(tmp_path, engines, tiny_model_dir):
    llama, _ = engines
    with pytest.raises(BadInputError, match="no adapter named 'x'"):
        llama.generate([GenerationRequest(prompt="hi", adapter="x")])
    with pytest.raises(BadInputError, match="PEFT adapter folder"):
        (tmp_path / "peft").mkdir()
        (tmp_path / "peft" / "adapter_config.json").write_text("{}")
        llama.load_adapter("a", tmp_path / "peft")
    with pytest.raises(BadInputError, match="not a GGUF LoRA adapter"):
        llama.load_adapter("a", llama.path)
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf at all")
    with pytest.raises(BadInputError, match="not a GGUF file"):
        open_engine(bogus)
    with pytest.raises(BadInputError, match="no such GGUF file"):
        from slmops.engines.llamacpp_engine import LlamaCppEngine

        LlamaCppEngine(tmp_path / "missing.gguf")
    with pytest.raises(BadInputError, match="context holds"):
        llama.generate([GenerationRequest(prompt="x " * 5000)])
