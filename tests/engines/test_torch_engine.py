"""The torch engine: matches transformers.generate token for token, batched and unbatched; sampling,
stop strings, streaming and logprobs behave."""

from __future__ import annotations

import math

import pytest
import torch

from slmops.engines import GenerationRequest, open_engine
from slmops.engines.torch_engine import TorchEngine
from slmops.errors import BadInputError

PROMPTS = [
    "Where is my order ORD-12345?",
    "Hi, my coffee grinder arrived broken. Order #998877. This is urgent.",
    "Cancel it",
    "Does the yoga mat come with a warranty? I have been a customer for years and I tried the help page.",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return open_engine(tiny_model_dir)


def _hf_greedy(engine: TorchEngine, texts: list[str], max_new: int) -> list[list[int]]:
    tok = engine.tokenizer
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = engine.model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                    pad_token_id=engine.pad_id, eos_token_id=list(engine.eos_ids))
    rows = []
    for seq in out[:, enc["input_ids"].shape[1]:].tolist():
        ids = []
        for t in seq:
            if t in engine.eos_ids:
                break
            ids.append(t)
        rows.append(ids)
    return rows


def test_open_engine_picks_torch(engine, tiny_model_dir):
    info = engine.info()
    assert engine.name == "torch" and info.format == "hf" and info.precision == "fp32"
    assert info.parameters > 0 and info.bytes_on_disk > 0 and info.vocab_size == engine.model.config.vocab_size


def test_matches_transformers_generate_unbatched(engine):
    for text in PROMPTS:
        ours = engine.generate([GenerationRequest(prompt=text, max_new_tokens=16)])[0]
        ref = _hf_greedy(engine, [text], 16)[0]
        assert ours.token_ids == ref, text
        assert ours.completion_tokens == len(ref)
        assert ours.prompt_tokens == len(engine.tokenize(text))


def test_matches_transformers_generate_batched(engine):
    ours = engine.generate([GenerationRequest(prompt=t, max_new_tokens=16) for t in PROMPTS])
    ref = _hf_greedy(engine, PROMPTS, 16)
    assert [r.token_ids for r in ours] == ref
    # and batching does not change a row's greedy output
    single = [engine.generate([GenerationRequest(prompt=t, max_new_tokens=16)])[0].token_ids for t in PROMPTS]
    assert single == ref


def test_chat_messages_use_the_chat_template(engine):
    req = GenerationRequest(messages=[{"role": "user", "content": "hello"}], max_new_tokens=4)
    rendered = engine.render(req)
    assert rendered == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    res = engine.generate([req])[0]
    assert res.prompt_tokens == len(engine.tokenize(rendered))


def test_max_new_tokens_and_finish_reason(engine):
    res = engine.generate([GenerationRequest(prompt=PROMPTS[0], max_new_tokens=5)])[0]
    assert res.completion_tokens <= 5
    assert res.finish_reason in ("length", "stop")
    if res.finish_reason == "length":
        assert res.completion_tokens == 5
    assert 0 <= res.ttft_s <= res.latency_s


def test_seeded_sampling_is_reproducible_and_independent_of_batch(engine):
    a = GenerationRequest(prompt=PROMPTS[1], max_new_tokens=12, temperature=1.0, seed=7)
    alone = engine.generate([a])[0].token_ids
    again = engine.generate([GenerationRequest(prompt=PROMPTS[1], max_new_tokens=12, temperature=1.0, seed=7)])[0]
    assert again.token_ids == alone
    other = GenerationRequest(prompt=PROMPTS[1] + " x", max_new_tokens=12, temperature=1.0, seed=8)
    in_batch = engine.generate([other, GenerationRequest(prompt=PROMPTS[1], max_new_tokens=12, temperature=1.0, seed=7)])
    assert in_batch[1].token_ids == alone
    seeds = {tuple(engine.generate([GenerationRequest(prompt=PROMPTS[1], max_new_tokens=12, temperature=1.0,
                                                      seed=s)])[0].token_ids) for s in range(5)}
    assert len(seeds) > 1  # different seeds sample differently


def test_top_k_one_equals_greedy(engine):
    greedy = engine.generate([GenerationRequest(prompt=PROMPTS[2], max_new_tokens=10)])[0].token_ids
    k1 = engine.generate([GenerationRequest(prompt=PROMPTS[2], max_new_tokens=10, temperature=0.7, top_k=1,
                                            seed=3)])[0].token_ids
    assert k1 == greedy


def test_stop_string_truncates_and_streams_identically(engine):
    full = engine.generate([GenerationRequest(prompt=PROMPTS[3], max_new_tokens=24)])[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = engine.generate([GenerationRequest(prompt=PROMPTS[3], max_new_tokens=24, stop=[stop])])[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert len(cut.text) == full.text.find(stop)
    events = list(engine.stream(GenerationRequest(prompt=PROMPTS[3], max_new_tokens=24, stop=[stop])))
    assert "".join(e.text for e in events) == cut.text
    assert events[-1].finish_reason == "stop"
    assert all(e.finish_reason is None for e in events[:-1])


def test_stream_equals_generate(engine):
    for text in PROMPTS[:2]:
        req = GenerationRequest(prompt=text, max_new_tokens=20)
        events = list(engine.stream(req))
        res = engine.generate([req])[0]
        assert "".join(e.text for e in events) == res.text
        assert [e.token_id for e in events if e.token_id is not None][: res.completion_tokens] == res.token_ids
        assert events[-1].completion_tokens == res.completion_tokens


def test_logprobs_match_manual_log_softmax(engine):
    texts = ["Where is my order?", "Cancel order ORD-1 please, it is late"]
    lps = engine.logprobs(texts)
    for text, lp in zip(texts, lps, strict=True):
        ids = torch.tensor([engine.tokenize(text)])
        with torch.inference_mode():
            logits = engine.model(input_ids=ids).logits[0].float()
        manual = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        assert lp.logprobs[0] is None and len(lp.logprobs) == ids.shape[1]
        assert all(math.isclose(a, float(b), abs_tol=1e-4) for a, b in zip(lp.logprobs[1:], manual, strict=True))
        assert lp.scored_tokens == ids.shape[1] - 1


def test_bad_requests_rejected(engine):
    with pytest.raises(BadInputError):
        GenerationRequest(prompt="x", max_new_tokens=0)
    with pytest.raises(BadInputError):
        GenerationRequest(prompt="x", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(BadInputError):
        GenerationRequest(prompt="x", temperature=-1)
    with pytest.raises(BadInputError, match="context"):
        engine.generate([GenerationRequest(prompt="7" * (engine.context_length + 5))])


def test_a_suspended_stream_does_not_leave_the_caller_in_inference_mode(engine):
    """Inference mode is thread-local: a stream paused between tokens must not hold it (it would break any
    training or autograd code the caller runs meanwhile)."""
    import torch

    stream = engine.stream(GenerationRequest(prompt="Where is my order", max_new_tokens=8))
    next(stream)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
    assert x.grad is not None
    stream.close()


def test_token_distributions_agree_with_logprobs(engine):
    import numpy as np

    text = "Cancel order ORD-1 please, it is late"
    dist = engine.token_distributions([text])[0]
    lp = engine.logprobs([text])[0]
    assert dist.shape == (len(lp.token_ids), engine.model.config.vocab_size)
    assert np.allclose(np.exp(dist).sum(-1), 1.0, atol=1e-4)
    picked = [float(dist[i, lp.token_ids[i + 1]]) for i in range(len(lp.token_ids) - 1)]
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(picked, lp.logprobs[1:], strict=True))
