"""Filters on teacher outputs: every rejection reason, majority vote, multi-teacher agreement, dedup."""

from __future__ import annotations

import json

import pytest

from slmops.data import validate_file
from slmops.distill import FilterConfig, apply_filters, build_dataset, filter_rows, near_duplicates, vote_key
from slmops.distill.filters import SampleChecker, jaccard, shingles
from slmops.errors import BadInputError


def row(index: int, prompt: str, samples: list[str], teacher: str = "t1", finish=None) -> dict:
    messages = [{"role": "user", "content": prompt}]
    return {"prompt_hash": f"{teacher}-{index}", "messages_hash": f"m{index}", "index": index,
            "messages": messages, "teacher": teacher, "samples": samples,
            "finish_reasons": finish or ["stop"] * len(samples)}


def reasons(config: FilterConfig, *texts: str) -> list[str | None]:
    check = SampleChecker(config)
    return [check(t) for t in texts]


def test_each_sample_reason():
    assert reasons(FilterConfig(), "", "   ") == ["empty", "empty"]
    assert SampleChecker(FilterConfig())("cut off", "length") == "truncated"
    assert SampleChecker(FilterConfig(drop_truncated=False))("cut off", "length") is None
    assert reasons(FilterConfig(json_valid=True), '{"a": 1}', "{a: 1}", " [1, 2] ") == [None, "invalid-json", None]
    schema = {"type": "object", "required": ["intent"], "properties": {"intent": {"enum": ["refund", "track"]}}}
    cfg = FilterConfig(json_schema=schema)
    assert cfg.json_valid
    assert reasons(cfg, '{"intent": "refund"}', '{"intent": "other"}', "{}", "nope") == [
        None, "schema-mismatch", "schema-mismatch", "invalid-json"]
    assert reasons(FilterConfig(regex=r"^ANSWER: \d+$"), "ANSWER: 42", "42") == [None, "regex-mismatch"]
    assert reasons(FilterConfig(min_chars=3, max_chars=5), "ab", "abc", "abcdef") == ["too-short", None, "too-long"]
    assert reasons(FilterConfig(), "I'm sorry, but I can't help with that.", "As an AI, I have no opinion.",
                   "I\u2019m sorry", "Sure: the answer is 4.") == ["refusal", "refusal", "refusal", None]
    assert reasons(FilterConfig(refusals=False), "I'm sorry, no.") == [None]
    assert reasons(FilterConfig(refusal_phrases=("nope",)), "Nope.", "I'm sorry") == ["refusal", None]


def test_token_bounds_with_a_tokenizer(tiny_tokenizer_dir):
    from slmops.data import load_tokenizer

    text = "Where is my order?"
    n = len(load_tokenizer(tiny_tokenizer_dir)(text, add_special_tokens=False)["input_ids"])
    assert n > 1
    assert SampleChecker(FilterConfig(tokenizer=str(tiny_tokenizer_dir), min_tokens=n, max_tokens=n))(text) is None
    assert SampleChecker(FilterConfig(tokenizer=str(tiny_tokenizer_dir), max_tokens=n - 1))(text) == "too-long"
    assert SampleChecker(FilterConfig(tokenizer=str(tiny_tokenizer_dir), min_tokens=n + 1))(text) == "too-short"
    words = FilterConfig(tokenizer=lambda text: len(text.split()), max_tokens=2)
    assert reasons(words, "one two", "one two three") == [None, "too-long"]
    with pytest.raises(BadInputError, match="need a tokenizer"):
        FilterConfig(max_tokens=5)


def test_bad_config_is_rejected_early(tmp_path):
    with pytest.raises(BadInputError, match="bad --regex"):
        FilterConfig(regex="(")
    with pytest.raises(BadInputError, match="bad JSON schema"):
        FilterConfig(json_schema={"type": 12})
    with pytest.raises(BadInputError, match="not found"):
        FilterConfig(json_schema=tmp_path / "missing.json")
    (tmp_path / "s.json").write_text(json.dumps({"type": "array"}))
    assert FilterConfig(json_schema=tmp_path / "s.json").json_schema == {"type": "array"}
    with pytest.raises(BadInputError):
        FilterConfig(near_dup_threshold=1.5)


def test_summary_counts_prompts_by_reason():
    rows = [row(0, "p0", ['{"x": 1}']), row(1, "p1", ["not json"]), row(2, "p2", [""]),
            row(3, "p3", ["I'm sorry, I cannot do that"]), row(4, "p4", ['{"x": 2}'])]
    kept, summary = apply_filters(rows, FilterConfig(json_valid=True))
    assert [k["messages"][-1]["content"] for k in kept] == ['{"x": 1}', '{"x": 2}']
    assert summary["total"] == 5 and summary["kept"] == 2
    assert summary["rejected"] == {"empty": 1, "invalid-json": 2}  # the refusal is not JSON either
    kept, summary = apply_filters(rows, FilterConfig())
    assert summary["rejected"] == {"empty": 1, "refusal": 1} and summary["kept"] == 3


def test_majority_vote_over_k_samples():
    samples = ['{"intent": "refund", "id": 7}', '{"id": 7,  "intent": "refund"}', '{"intent": "track"}',
               "not json at all"]
    out = filter_rows([row(0, "q", samples)], FilterConfig(json_valid=True))
    (ex,) = out.kept
    assert json.loads(ex["messages"][-1]["content"]) == {"intent": "refund", "id": 7}  # parsed JSON compared
    assert ex["messages"][-1]["content"] == samples[0]  # the first sample of the winning group
    assert ex["metadata"]["agreement"] == 0.5  # 2 of all 4 samples (the invalid one counts as disagreeing)
    assert out.summary["samples"]["rejected"] == {"invalid-json": 1}
    # text answers compare with whitespace and case normalised
    out = filter_rows([row(0, "q", ["Paris", " paris ", "Lyon"])])
    assert out.kept[0]["messages"][-1]["content"] == "Paris" and out.kept[0]["metadata"]["agreement"] == 0.6667
    # ties go to the earliest answer
    assert filter_rows([row(0, "q", ["B", "A", "A", "B"])]).kept[0]["messages"][-1]["content"] == "B"


def test_min_agreement_rejects_and_records():
    rows = [row(0, "q0", ["a", "a", "b"]), row(1, "q1", ["a", "b", "c"])]
    out = filter_rows(rows, FilterConfig(min_agreement=0.6))
    assert [e["metadata"]["index"] for e in out.kept] == [0]
    assert out.summary["rejected"] == {"low-agreement": 1}
    (rej,) = out.rejected
    assert rej["reason"] == "low-agreement" and rej["metadata"]["agreement"] == 0.3333
    assert [s["text"] for s in rej["samples"]] == ["a", "b", "c"]


def test_multi_teacher_vote_records_who_agreed():
    rows = [row(0, "q", ['{"a": 1}', '{"a": 1}'], teacher="big"),
            row(0, "q", ['{"a":1}'], teacher="mid"),
            row(0, "q", ['{"a": 2}', "Sorry"], teacher="small"),
            row(1, "r", ['{"b": 1}'], teacher="big"),
            row(1, "r", ['{"b": 2}'], teacher="mid")]
    out = filter_rows(rows, FilterConfig(json_valid=True))
    first, second = out.kept
    m = first["metadata"]
    assert m["teachers"] == ["big", "mid", "small"] and m["agreeing_teachers"] == ["big", "mid"]
    assert m["agreement"] == 0.6 and m["n_samples"] == 5
    assert m["teacher_votes"] == {"big": 1.0, "mid": 1.0, "small": 0.0}
    assert second["metadata"]["agreeing_teachers"] == ["big"]  # a 1-1 tie: the first teacher's answer
    assert out.summary["teacher_agreement"] == {"big": 1.0, "mid": 0.5, "small": 0.0}


def test_exact_duplicates_removed_after_normalisation():
    rows = [row(0, "What is 2+2?", ["4"]), row(1, "what is  2+2?", ["4 "]), row(2, "What is 2+2?!", ["4"]),
            row(3, "what is 2+2?", ["5"])]
    out = filter_rows(rows)
    assert [e["metadata"]["index"] for e in out.kept] == [0, 2, 3]
    assert out.summary["rejected"] == {"duplicate": 1}
    assert out.rejected[0]["metadata"]["duplicate_of"] == 0
    assert len(filter_rows(rows, FilterConfig(dedup=False)).kept) == 4


def test_near_duplicates_by_shingle_jaccard():
    base = "My order ORD-12345 arrived damaged, the box was crushed and the mug inside is broken."
    texts = [base, base.replace("crushed", "crushed!"), "Where can I download my invoice for last month?",
             base.replace("mug", "lamp"), "Completely different question about shipping times to Canada."]
    assert round(jaccard(shingles(texts[0]), shingles(texts[1])), 3) == 0.894  # one character inserted
    assert round(jaccard(shingles(texts[0]), shingles(texts[3])), 3) == 0.83  # one word changed
    assert jaccard(shingles(base), shingles(base.upper())) == 1.0  # compared case folded
    assert near_duplicates(texts, 0.85) == {1: 0}
    assert near_duplicates(texts, 0.8) == {1: 0, 3: 0}
    assert near_duplicates(texts, 0.95) == {}
    rows = [row(i, t, [f"answer {i}"]) for i, t in enumerate(texts)]
    out = filter_rows(rows, FilterConfig(near_dup_threshold=0.85))
    assert [e["metadata"]["index"] for e in out.kept] == [0, 2, 3, 4]
    assert out.summary["rejected"] == {"near-duplicate": 1}
    assert len(filter_rows(rows).kept) == 5  # off by default


def test_near_duplicates_scale_and_agree_with_brute_force():
    import random

    rng = random.Random(0)
    words = ["order", "refund", "broken", "late", "invoice", "account", "password", "shipping", "mug", "lamp"]
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(150)]
    texts += [t + " please" for t in texts[:30]]  # 30 near copies
    got = near_duplicates(texts, 0.8)
    sh = [shingles(t) for t in texts]
    kept: list[int] = []
    expected = {}
    for i in range(len(texts)):
        match = next((j for j in kept if jaccard(sh[i], sh[j]) >= 0.8), None)
        if match is None:
            kept.append(i)
        else:
            expected[i] = match
    assert set(got) == set(expected) and len(got) >= 30


def test_vote_key():
    assert vote_key('{"b": 1, "a": [1, 2]}') == vote_key('{ "a": [1,2], "b": 1 }')
    assert vote_key("Hello   World") == vote_key("hello world")
    assert vote_key("42") == vote_key(" 42 ") != vote_key("42.5")


def test_built_dataset_validates_as_chat_training_data(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rows = [row(0, "q0", ['{"a": 1}']), row(1, "q1", ["bad"]), row(2, "q2", ['{"a": 3}'])]
    for r in rows:
        r["messages"] = [{"role": "system", "content": "Answer in JSON."}, *r["messages"]]
    (out / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outcome = build_dataset(out, None, FilterConfig(json_valid=True))
    assert outcome.summary["kept"] == 2
    report = validate_file(out / "train.jsonl", purpose="train")
    assert report.ok and report.format == "chat" and report.n_records == 2
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["reason"] == "invalid-json" and rejected[0]["samples"][0]["reason"] == "invalid-json"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["filters"]["rejected"] == {"invalid-json": 1} and summary["filter_config"]["json_valid"]
