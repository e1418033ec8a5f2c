"""Metric unit tests with known values, and bootstrap intervals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from slmops.evaluate import metrics as M
from slmops.evaluate.bootstrap import MetricSamples, bootstrap, exp_ratio


def test_token_f1_squad_style():
    assert M.token_f1("The cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3))
    assert M.token_f1("Paris!", "paris") == 1.0  # case, punctuation
    assert M.token_f1("", "") == 1.0 and M.token_f1("x", "") == 0.0 and M.token_f1("abc", "xyz") == 0.0
    assert M.normalize_answer("The  Quick, brown fox.") == "quick brown fox"


def test_rouge_l_known_values():
    assert M.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS "the cat the mat" = 4 of 6 tokens each side: P = R = F = 4/6
    assert M.rouge_l("the cat was on the mat", "the cat sat at the mat") == pytest.approx(4 / 6)
    assert M.rouge_l("completely different", "nothing shared here") == 0.0


def test_bleu_matches_sacrebleu_corpus_bleu():
    import sacrebleu

    preds = ["the cat sat on the mat", "a quick brown fox jumps", "hello there world"]
    refs = ["the cat sat on a mat", "the quick brown fox jumps over", "hello world"]
    expected = sacrebleu.corpus_bleu(preds, [refs]).score
    assert M.corpus_bleu(preds, refs) == pytest.approx(expected)
    stats = np.asarray(M.bleu_stats(preds, refs)).sum(axis=0)
    assert M.bleu_from_stats(stats) == pytest.approx(expected)
    # the bootstrap's point estimate is the corpus BLEU, not a mean of sentence scores
    s = MetricSamples("bleu", np.asarray(M.bleu_stats(preds, refs), dtype=float), M.bleu_from_stats)
    assert bootstrap(s, resamples=50).value == pytest.approx(expected)


def test_labels_and_json_schema():
    assert M.label_match("Positive.", "positive")
    assert not M.label_match("negative", "positive")
    assert M.label_match('{"intent": "refund", "x": 1}', '{"intent": "refund", "x": 2}', "intent")
    assert not M.label_match("{}", '{"intent": "refund"}', "intent")
    schema = {"type": "object", "required": ["intent"], "properties": {"intent": {"enum": ["a", "b"]}}}
    assert M.json_schema_valid('{"intent": "a"}', schema) == (True, None)
    ok, why = M.json_schema_valid('{"intent": "c"}', schema)
    assert not ok and "intent" in why
    assert M.json_schema_valid("not json", schema)[0] is False


def test_field_accuracy_and_score_answers_unchanged():
    ref = json.dumps({"a": 1, "b": "x"})
    assert M.field_accuracy(json.dumps({"a": 1, "b": "y"}), ref) == {"a": True, "b": False}
    scores, rows = M.score_answers([ref, "nope"], [ref, ref])
    assert scores["exact_match"] == 0.5 and scores["field_accuracy"] == 0.5 and len(rows) == 2


def test_bootstrap_interval_contains_estimate_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 200, 2000):
        values = rng.random(n) < 0.7
        s = bootstrap(MetricSamples.mean("em", values), resamples=1000, seed=0)
        assert s.low <= s.value <= s.high and s.n == n
        assert s.value == pytest.approx(values.mean())
        widths.append(s.high - s.low)
    assert widths[0] > widths[1] > widths[2]
    # seeded: the same interval twice
    v = rng.random(50) < 0.5
    assert bootstrap(MetricSamples.mean("x", v), seed=3) == bootstrap(MetricSamples.mean("x", v), seed=3)


def test_bootstrap_ratio_metrics_and_degenerate_cases():
    ppl = MetricSamples.ratio_of_sums("perplexity", [2.0, 4.0], [2, 2], exp_ratio)
    assert ppl.value() == pytest.approx(math.exp(1.5))
    const = bootstrap(MetricSamples.mean("em", [1, 1, 1]), resamples=100)
    assert const.value == const.low == const.high == 1.0
    assert bootstrap(MetricSamples.mean("em", []), resamples=10).value is None
    # a field only some examples have: n counts those
    field = MetricSamples.ratio_of_sums("field.x", [1, 0, 0], [1, 1, 0])
    assert field.value() == 0.5 and field.n == 2
