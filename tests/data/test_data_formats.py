"""Format detection and normalisation to chat messages."""

from __future__ import annotations

import pytest

from slmops.data import (
    FormatSpec,
    detect_format,
    normalise_record,
    resolve_spec,
    to_messages,
    to_prompt_messages,
)
from slmops.errors import BadInputError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([CHAT], "chat"),
        ([{"prompt": "p", "completion": "c"}], "prompt-completion"),
        ([{"prompt": "p"}, {"prompt": "p", "completion": "c"}], "prompt-completion"),
        ([{"prompt": "p"}, {"prompt": "q", "id": 3}], "prompt"),
        ([{"input": "i", "output": "o"}], "input-output"),
        ([CHAT, CHAT, {"prompt": "p"}], "chat"),  # majority wins; the odd one fails validation
        ([{"prompt": "p", "completion": None}], "prompt"),  # null counts as missing
        ([[1, 2], CHAT], "chat"),  # non-objects do not vote
    ],
)
def test_detect_format(records, expected):
    assert detect_format(records) == expected


def test_detect_format_fails_with_the_fields_and_a_hint():
    with pytest.raises(BadInputError, match="question") as exc:
        detect_format([{"question": "q", "answer": "a"}])
    assert "--template" in str(exc.value)


def test_template_spec_defaults_completion_to_output_when_present():
    assert resolve_spec([{"q": "x", "output": "y"}], template="Q: {q}").completion_field == "output"
    assert resolve_spec([{"q": "x"}], template="Q: {q}").completion_field is None


def test_normalise_each_format():
    assert to_messages(CHAT) == CHAT["messages"]
    assert to_messages({"prompt": "p", "completion": "c"}) == [
        {"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert to_messages({"input": "i", "output": "o", "system": "be brief"}) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "i"},
        {"role": "assistant", "content": "o"}]
    assert to_messages({"prompt": "p"}) == [{"role": "user", "content": "p"}]
    record = {"question": "2+2", "n": 3, "answer": "4"}
    assert to_messages(record, template="Q: {question} ({n})", completion_field="answer") == [
        {"role": "user", "content": "Q: 2+2 (3)"}, {"role": "assistant", "content": "4"}]


def test_chat_keeps_name_and_drops_null_keys():
    record = {"id": 1, "messages": [{"role": "user", "content": "q", "name": "bob"},
                                    {"role": "assistant", "content": "a", "name": None}]}
    assert to_messages(record) == [{"role": "user", "content": "q", "name": "bob"}, A]


def test_to_prompt_messages_drops_the_final_answer():
    assert to_prompt_messages(CHAT) == [{"role": "user", "content": "hi"}]
    assert to_prompt_messages({"prompt": "p", "completion": "c"}) == [{"role": "user", "content": "p"}]
    multi = {"messages": [U, A, U, A]}
    assert to_prompt_messages(multi) == [U, A, U]
    assert to_prompt_messages({"messages": [U]}) == [U]


def test_to_messages_raises_with_every_problem():
    with pytest.raises(BadInputError) as exc:
        to_messages({"prompt": 3, "completion": "", "extra": 1}, "prompt-completion")
    msg = str(exc.value)
    assert "wrong type" in msg and "empty content" in msg and "unknown field 'extra'" in msg


def test_require_completion():
    spec = FormatSpec("chat")
    assert normalise_record({"messages": [U]}, spec)[0] == [U]
    _, problems = normalise_record({"messages": [U]}, spec, require_completion=True)
    assert [p.kind for p in problems] == ["role-order"]
    _, problems = normalise_record({"prompt": "p"}, FormatSpec("prompt-completion"), require_completion=True)
    assert problems[0].reason == "missing required field 'completion'"


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([A, U], "messages[0] is 'assistant', expected 'user'"),
        ([U, U], "messages[1] is 'user', expected 'assistant'"),
        ([U, {"role": "system", "content": "s"}, A], "system message at messages[1]"),
        ([{"role": "system", "content": "s"}], "no user message"),
        ([{"role": "bot", "content": "s"}], "unknown role 'bot'"),
    ],
)
def test_bad_role_order(messages, fragment):
    _, problems = normalise_record({"messages": messages}, FormatSpec("chat"))
    assert problems and problems[0].kind == "role-order"
    assert fragment in problems[0].reason


def test_system_first_is_fine():
    messages = [{"role": "system", "content": "s"}, U, A, U, A]
    assert to_messages({"messages": messages}, "chat") == messages


def test_template_problems():
    spec = FormatSpec("template", template="{a} {b}", completion_field="out")
    _, problems = normalise_record({"a": "x", "out": "y"}, spec)
    assert problems[0].reason == "missing required field 'b' (used by --template)"
    _, problems = normalise_record({"a": " ", "b": "", "out": "y"}, spec)
    assert problems[0].kind == "empty-content"
    _, problems = normalise_record({"a": [1], "b": "x", "out": "y"}, spec)
    assert problems[0].kind == "wrong-type"
    _, problems = normalise_record({"n": "3"}, FormatSpec("template", template="{n:d}"))
    assert problems[0].reason.startswith("wrong type: cannot render --template")


@pytest.mark.parametrize("template", ["{", "no fields", "{a.b}", "{0}"])
def test_bad_templates(template):
    with pytest.raises(BadInputError):
        FormatSpec("template", template=template)


def test_bad_spec_combinations():
    with pytest.raises(BadInputError, match="unknown format"):
        FormatSpec("alpaca")
    with pytest.raises(BadInputError, match="needs --template"):
        FormatSpec("template")
    with pytest.raises(BadInputError, match="only applies"):
        FormatSpec("chat", template="{a}")
