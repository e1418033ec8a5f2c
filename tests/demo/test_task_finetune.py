"""The demo task's fine-tuning extensions: new intents the base task never draws, deterministic fine-tuning
sets with base-task replay, and a base generator that stays byte-identical."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import pytest

from slmops.demo import task
from slmops.errors import BadInputError

# sha256 of the base generator's output (seeds 0 and 3, base and hard, 400 each), computed before the
# extensions existed: the bundled teacher, the quickstart and the tests rely on that data staying the same.
BASE_GENERATOR_SHA256 = "f804dddcd3b096afa8fec5db1228c7a3839dd0f8bb29b85b58be74f8ee5df7a5"


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _intent(row) -> str:
    return json.loads(row["messages"][1]["content"])["intent"]


def _msg(row) -> str:
    return row["messages"][0]["content"]


def test_base_generator_unchanged():
    h = hashlib.sha256()
    for seed in (0, 3):
        for hard in (False, True):
            for ex in task.generate(400, seed=seed, hard=hard):
                h.update((ex.message + "\t" + ex.answer_text + "\n").encode())
    assert h.hexdigest() == BASE_GENERATOR_SHA256


def test_extension_intents_are_new_and_never_drawn_by_the_base_generator():
    ext = [i for intents in task.EXTENSION_TASKS.values() for i in intents]
    assert set(task.EXTENSION_TASKS) == {"gifts", "subscriptions"}
    assert len(ext) == len(set(ext)) == 4 and not set(ext) & set(task.INTENTS)
    assert len(task.INTENTS) == 12
    assert {e.answer["intent"] for e in task.generate(3000, seed=4)} <= set(task.INTENTS)
    for intents in task.EXTENSION_TASKS.values():
        for intent in intents:
            assert len(task.ALL_TEMPLATES[intent]) >= 5


def test_make_example_for_extension_intents_follows_from_the_message():
    rng = random.Random(0)
    for intent in [i for intents in task.EXTENSION_TASKS.values() for i in intents]:
        for _ in range(50):
            ex = task.make_example(rng, intent=intent)
            obj = json.loads(ex.answer_text)
            assert obj["intent"] == intent and list(obj) == list(task.FIELDS)
            for k in ("order_id", "product", "date"):
                if obj[k] is not None:
                    assert obj[k] in ex.message
    with pytest.raises(BadInputError, match="unknown intent"):
        task.make_example(rng, intent="no_such_intent")


def test_finetune_data_splits_intents_and_replay(tmp_path):
    sizes = task.FinetuneSizes(train=400, val=40, test=100, test_base=80)
    out = task.write_finetune_data(tmp_path / "gifts", "gifts", seed=0, sizes=sizes, replay=0.25)
    rows = {k: _rows(out[k]) for k in ("train", "val", "test", "test_base")}
    assert {k: len(v) for k, v in rows.items()} == {"train": 400, "val": 40, "test": 100, "test_base": 80}
    new, base = set(task.EXTENSION_TASKS["gifts"]), set(task.INTENTS)
    # test holds only the new intents (both of them); test_base only base intents
    test_intents = Counter(_intent(r) for r in rows["test"])
    assert set(test_intents) == new
    assert {_intent(r) for r in rows["test_base"]} <= base
    # train/val: the replay fraction of base-task rows, the rest new-task rows
    for split, n in (("train", 400), ("val", 40)):
        n_base = sum(_intent(r) in base for r in rows[split])
        assert n_base == round(0.25 * n) == out["counts"][split]["base"]
        assert all(_intent(r) in base | new for r in rows[split])
    assert len({_intent(r) for r in rows["train"] if _intent(r) in base}) >= 8  # replay covers the base intents
    # disjoint splits, rows in the format to_chat_row writes
    msgs = {k: {_msg(r) for r in v} for k, v in rows.items()}
    for a in msgs:
        for b in msgs:
            if a < b:
                assert not msgs[a] & msgs[b], (a, b)
    assert set(rows["train"][0]) == {"messages"} and rows["train"][0]["messages"][1]["role"] == "assistant"
    info = json.loads(open(out["task_file"]).read())
    assert info["task"] == "gifts" and info["intents"] == list(task.EXTENSION_TASKS["gifts"])


def test_finetune_data_deterministic_and_seeded(tmp_path):
    sizes = task.FinetuneSizes(train=120, val=20, test=30, test_base=30)
    a = task.write_finetune_data(tmp_path / "a", "subscriptions", seed=1, sizes=sizes)
    b = task.write_finetune_data(tmp_path / "b", "subscriptions", seed=1, sizes=sizes)
    c = task.write_finetune_data(tmp_path / "c", "subscriptions", seed=2, sizes=sizes)
    for k in ("train", "val", "test", "test_base"):
        assert open(a[k]).read() == open(b[k]).read()
        assert open(a[k]).read() != open(c[k]).read()
    assert {_intent(r) for r in _rows(a["test"])} == set(task.EXTENSION_TASKS["subscriptions"])


def test_finetune_replay_zero_and_base_stream_separate_from_demo_data(tmp_path):
    sizes = task.FinetuneSizes(train=50, val=10, test=10, test_base=50)
    out = task.write_finetune_data(tmp_path, "gifts", seed=0, sizes=sizes, replay=0.0)
    assert all(_intent(r) in task.EXTENSION_TASKS["gifts"] for r in _rows(out["train"]))
    demo = [e.message for e in task.generate(50, seed=0)]
    assert [_msg(r) for r in _rows(out["test_base"])] != demo  # its own random stream


def test_finetune_data_rejects_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="unknown fine-tuning task"):
        task.write_finetune_data(tmp_path, "nope")
    with pytest.raises(BadInputError, match="replay"):
        task.write_finetune_data(tmp_path, "gifts", replay=1.0)
