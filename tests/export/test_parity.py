"""Parity metrics on engines with known distributions and answers; gates; the markdown table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slmops.engines.base import EngineInfo, GenerationResult, Logprobs
from slmops.errors import BadInputError, GateFailedError
from slmops.export.parity import (
    ParityReport,
    check_gates,
    measure_parity,
    parity_table,
    perplexity,
    texts_from_records,
)


class FakeEngine:
    """Tokens are the words of a text (ids from a fixed vocabulary); the next-token distribution is a fixed
    row `probs` whatever the context; answers come from a dict."""

    def __init__(self, name, probs, answers=None, params=1000, size=500, vocab=None, distributions=True):
        self.name = name
        self.probs = np.asarray(probs, dtype=np.float64)
        self.answers = answers or {}
        self.params, self.size = params, size
        self.vocab = vocab or ["a", "b", "c", "d"]
        if not distributions:  # an engine without the optional method (e.g. a remote server)
            self.token_distributions = None

    def info(self):
        return EngineInfo(name=self.name, format="x", precision="x", parameters=self.params, bytes_on_disk=self.size,
                          device="cpu", path="")

    def tokenize(self, text):
        return [self.vocab.index(w) for w in text.split()]

    def token_distributions(self, texts):
        return [np.log(np.tile(self.probs, (len(self.tokenize(t)), 1))) for t in texts]

    def logprobs(self, texts):
        out = []
        for t in texts:
            ids = self.tokenize(t)
            out.append(Logprobs(ids, t.split(), [None] + [math.log(self.probs[i]) for i in ids[1:]]))
        return out

    def generate(self, requests):
        return [GenerationResult(self.answers.get(r.messages[-1]["content"], ""), [], "stop", 1, 1, 0.0, 0.0)
                for r in requests]


P = [0.7, 0.1, 0.1, 0.1]
Q = [0.4, 0.3, 0.2, 0.1]
RECORDS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
           for i in range(4)]


def test_size_perplexity_kl_and_top1():
    src, cand = FakeEngine("torch", P, params=1000), FakeEngine("onnx", Q, size=500)
    texts = ["a b c", "a a d d"]
    r = measure_parity(src, cand, texts=texts)
    assert r.size_bytes == 500 and r.source_fp16_bytes == 2000 and r.size_ratio_vs_fp16 == 0.25
    # perplexity over the 3 scored tokens (b, c; a, d, d) of both texts together
    want_src = math.exp(-(math.log(0.1) * 2 + math.log(0.7) + math.log(0.1) * 2) / 5)
    assert r.ppl_source == pytest.approx(want_src)
    assert r.ppl_ratio == pytest.approx(r.ppl_candidate / r.ppl_source)
    kl = sum(p * math.log(p / q) for p, q in zip(P, Q, strict=True))
    assert r.mean_kl == pytest.approx(kl) and r.n_kl_tokens == 7
    assert r.top1_agreement == 1.0 and r.n_texts == 2 and r.n_records == 0
    assert r.exact_match_source is None and r.exact_match_retention is None
    assert perplexity(src, texts) == pytest.approx(want_src)


def test_top1_disagreement_and_explicit_sizes():
    src, cand = FakeEngine("torch", P), FakeEngine("gguf", [0.1, 0.7, 0.1, 0.1])
    r = measure_parity(src, cand, texts=["a b"], candidate_bytes=300, source_fp16_bytes=1200)
    assert r.top1_agreement == 0.0 and r.size_ratio_vs_fp16 == 0.25


def test_kl_skipped_without_distributions_or_with_other_tokenization():
    r = measure_parity(FakeEngine("torch", P), FakeEngine("openai-http", Q, distributions=False), texts=["a b"])
    assert r.mean_kl is None and r.top1_agreement is None and r.ppl_candidate is not None
    assert any("openai-http" in n for n in r.notes)
    other = FakeEngine("gguf", Q, vocab=["b", "a", "c", "d"])  # same words, other ids
    r = measure_parity(FakeEngine("torch", P), other, texts=["a b", "c"])
    assert r.n_kl_tokens == 1 and any("tokenize them differently" in n for n in r.notes)


def test_vocabulary_width_mismatch_compares_shared_ids():
    src = FakeEngine("torch", [0.5, 0.5])
    src.vocab = ["a", "b"]
    cand = FakeEngine("gguf", [0.25, 0.25, 0.5])  # a padded vocabulary: renormalised over the first two
    cand.vocab = ["a", "b", "c"]
    r = measure_parity(src, cand, texts=["a b"])
    assert r.mean_kl == pytest.approx(0.0, abs=1e-12) and any("widths differ" in n for n in r.notes)


def test_task_metric_and_retention():
    answers_src = {f"q{i}": f"a{i}" for i in range(4)}
    answers_cand = {**answers_src, "q3": "wrong"}
    r = measure_parity(FakeEngine("torch", P, answers_src), FakeEngine("onnx", Q, answers_cand), records=RECORDS)
    assert r.exact_match_source == 1.0 and r.exact_match_candidate == 0.75 and r.exact_match_retention == 0.75
    assert r.n_records == 4 and r.ppl_source is None
    zero = measure_parity(FakeEngine("torch", P, {}), FakeEngine("onnx", Q, {}), records=RECORDS)
    assert zero.exact_match_retention is None and any("scores 0" in n for n in zero.notes)


def test_gates():
    ok = ParityReport(ppl_source=10.0, ppl_candidate=10.4, ppl_ratio=1.04, exact_match_source=1.0,
                      exact_match_candidate=0.99, exact_match_retention=0.99)
    check_gates(ok, max_ppl_increase=0.05, min_task_retention=0.98)
    check_gates(ok)  # no gates, nothing to check
    with pytest.raises(GateFailedError) as e:
        check_gates(ok, max_ppl_increase=0.03, min_task_retention=0.995)
    assert e.value.exit_code == 3
    assert "perplexity rose +4.00%" in e.value.message and "exact match kept 99.0%" in e.value.message
    assert e.value.report is ok
    with pytest.raises(GateFailedError, match="perplexity") as e:
        check_gates(ok, max_ppl_increase=0.01, min_task_retention=0.9)
    assert "exact match" not in e.value.message
    with pytest.raises(BadInputError, match="eval-file"):
        check_gates(ParityReport(), min_task_retention=0.9)
    with pytest.raises(BadInputError, match="eval-file"):
        check_gates(ParityReport(), max_ppl_increase=0.1)


def test_parity_table_and_round_trip():
    r = ParityReport(size_bytes=250 * 2**20, source_fp16_bytes=1000 * 2**20, size_ratio_vs_fp16=0.25, ppl_source=3.0,
                     ppl_candidate=3.3, ppl_ratio=1.1, mean_kl=0.012, top1_agreement=0.93, exact_match_source=0.99,
                     exact_match_candidate=0.98, exact_match_retention=0.98 / 0.99, n_texts=5, n_records=10,
                     n_kl_tokens=300, notes=["a note"])
    table = parity_table(r)
    lines = table.splitlines()
    assert lines[0] == "| metric | source | export | change |"
    assert "| size on disk (source: fp16) | 1000.0 MB | 250.0 MB | 0.250x (75% smaller) |" in table
    assert "+10.00%" in table and "93.0%" in table and "retention 99.0%" in table and "note: a note" in table
    assert ParityReport.from_dict(r.to_dict()) == r
    assert "perplexity" not in parity_table(ParityReport(size_bytes=1, source_fp16_bytes=2, size_ratio_vs_fp16=0.5))


def test_texts_from_records_use_the_chat_template(tiny_model_dir):
    from slmops.engines import open_engine

    texts = texts_from_records(RECORDS[:1], open_engine(tiny_model_dir))
    assert texts == ["<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\na0<|im_end|>\n"]
    template = (tiny_model_dir / "chat_template.jinja").read_text()
    assert texts_from_records(RECORDS[:1], chat_template=template) == texts
    assert texts_from_records(RECORDS[:1]) == ["q0\na0"]
