"""Tokenizer and chat-template compatibility between teacher and student, checked from files only."""

from __future__ import annotations

import json

import pytest

from slmops.distill.compat import check_tokenizer_compat


@pytest.fixture(scope="module")
def tok300(demo_examples):
    from slmops.models.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([e.message for e in demo_examples] + [e.answer_text for e in demo_examples],
                               vocab_size=300)


@pytest.fixture(scope="module")
def tok400(demo_examples):
    from slmops.models.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([e.message for e in demo_examples] + [e.answer_text for e in demo_examples],
                               vocab_size=400)


def test_same_tokenizer_is_compatible(tok300, tiny_model_dir):
    report = check_tokenizer_compat(tiny_model_dir, tiny_model_dir)
    assert report.compatible and report.same_mapping and report.same_chat_template
    assert report.shared_vocab == report.student_model_vocab == 300
    assert report.problems == [] and "compatible" in report.describe()


def test_different_vocabularies_are_named(tok300, tok400):
    report = check_tokenizer_compat(tok300, tok400)
    assert not report.compatible and not report.same_mapping
    assert report.shared_vocab is None
    assert report.differing_ids > 0
    msg = report.describe()
    assert "student vocab 300 tokens vs teacher 400" in msg
    assert f"{report.differing_ids} token ids differ" in msg


def test_padded_model_vocab_is_compatible(tiny_tokenizer_dir, tiny_model_dir, tmp_path):
    # the same tokenizer, the teacher's embedding padded to 364 rows (as Qwen pads 151665 tokens to 151936)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for f in tiny_tokenizer_dir.iterdir():
        (teacher / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**cfg, "vocab_size": 364}))
    report = check_tokenizer_compat(tiny_model_dir, teacher)
    assert report.compatible
    assert (report.student_model_vocab, report.teacher_model_vocab, report.shared_vocab) == (300, 364, 300)
    assert any("padded vocab sizes differ (student 300 vs teacher 364)" in n for n in report.notes)


def test_model_vocab_smaller_than_tokenizer_is_a_problem(tok300):
    report = check_tokenizer_compat(tok300, tok300, student_model_vocab=250, teacher_model_vocab=300)
    assert not report.compatible
    assert "student model's vocab_size 250 is smaller than its tokenizer (300 tokens)" in report.describe()


def test_chat_templates(tok300):
    import copy

    other = copy.deepcopy(tok300)
    other.chat_template = "{# same output, other text #}" + tok300.chat_template
    report = check_tokenizer_compat(tok300, other)
    assert report.compatible and report.same_chat_template
    assert any("render the probe conversations identically" in n for n in report.notes)

    other.chat_template = tok300.chat_template.replace("<|im_start|>", "<|im_start|> ")
    report = check_tokenizer_compat(tok300, other)
    assert not report.compatible and not report.same_chat_template
    assert "chat templates render conversations differently" in report.describe()

    bare = copy.deepcopy(tok300)
    bare.chat_template = None
    report = check_tokenizer_compat(bare, tok300)
    assert report.compatible and not report.student_has_chat_template
    assert any("the teacher's is used" in n for n in report.notes)
