"""The demo task generator: deterministic, varied, and every answer follows from its message."""

from __future__ import annotations

import json
from collections import Counter

from slmops.demo import task


def test_deterministic_by_seed():
    a = task.generate(200, seed=5)
    b = task.generate(200, seed=5)
    c = task.generate(200, seed=6)
    assert a == b and a != c


def test_answers_follow_from_messages():
    exs = task.generate(2000, seed=1)
    intents = Counter(e.answer["intent"] for e in exs)
    assert len(intents) >= 10 and min(intents.values()) > 50
    assert {e.answer["urgency"] for e in exs} == {"high", "normal", "low"}
    for e in exs:
        obj = json.loads(e.answer_text)
        assert list(obj) == list(task.FIELDS)
        for k in ("order_id", "product", "date"):
            if obj[k] is not None:
                assert obj[k] in e.message
        if obj["urgency"] == "high":
            assert any(m in e.message for m in task.HIGH)
        elif obj["urgency"] == "low":
            assert any(m in e.message for m in task.LOW)
        else:
            assert not any(m in e.message for m in task.HIGH + task.LOW)


def test_many_paraphrases_and_distinct_messages():
    exs = task.generate(3000, seed=2)
    assert len({e.message for e in exs}) == 3000
    assert sum(len(t) for t in task.TEMPLATES.values()) >= 50


def test_hard_variant_is_longer_with_distractors():
    base = task.generate(300, seed=0)
    hard = task.generate(300, seed=0, hard=True)
    mean = lambda xs: sum(len(e.message) for e in xs) / len(xs)  # noqa: E731
    assert mean(hard) > 1.3 * mean(base)
    # a distractor order id or product appears besides the answer's own
    with_other = 0
    for e in hard:
        others = [p for p in task.PRODUCTS if p in e.message and p != e.answer["product"]]
        with_other += bool(others) or e.message.count("order ") + e.message.count("Order ") > 1
    assert with_other > 100


def test_write_demo_data_disjoint_splits(tmp_path):
    paths = task.write_demo_data(tmp_path, seed=0)
    sizes = task.DemoSizes()
    rows = {k: [json.loads(line) for line in open(p)] for k, p in paths.items()}
    assert len(rows["train"]) == sizes.train and len(rows["test"]) == sizes.test
    assert len(rows["prompts"]) == sizes.prompts and set(rows["prompts"][0]) == {"prompt"}
    msg = lambda r: r["messages"][0]["content"]  # noqa: E731
    train, test, gold = {msg(r) for r in rows["train"]}, {msg(r) for r in rows["test"]}, {msg(r) for r in rows["gold"]}
    prompts = {r["prompt"] for r in rows["prompts"]}
    assert not (train & test) and not (prompts & test) and not (gold & test)
    again = task.write_demo_data(tmp_path / "again", seed=0)
    assert open(again["test"]).read() == open(paths["test"]).read()
