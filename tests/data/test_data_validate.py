"""Validation: every reason, every bad record at once; load_dataset_file refuses bad files."""

from __future__ import annotations

import json

import pytest

from slmops.data import load_dataset_file, validate_file
from slmops.errors import BadInputError


def chat(user: str = "q", answer: str | None = "a", **extra) -> dict:
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, **extra}


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from slmops.models.tokenizer import save_tokenizer, train_bpe_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "hello world", "q a"] * 20
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_bpe_tokenizer(texts, vocab_size=300), out)
    return out


@pytest.mark.parametrize(
    ("row", "kind", "fragment"),
    [
        ('{"messages": [', "malformed-json", "malformed JSON"),
        ({"id": 1}, "missing-field", "missing required field 'messages'"),
        ({"messages": [{"role": "user"}]}, "missing-field", "'messages[0].content'"),
        (chat(extra=1), "unknown-field", "unknown field 'extra'"),
        ({"messages": [{"role": "user", "content": "q", "x": 1}]}, "unknown-field", "messages[0].x"),
        ({"messages": "hi"}, "wrong-type", "'messages' must be a list, got string"),
        ({"messages": [{"role": "user", "content": ["q"]}]}, "wrong-type", "must be a string, got array"),
        ([1, 2], "wrong-type", "a record must be an object"),
        (chat(answer="  \n"), "empty-content", "messages[1].content (assistant)"),
        ({"messages": []}, "empty-content", "empty list"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "role-order", "expected 'user'"),
        (chat(answer=None), "role-order", "must end with an assistant turn"),
    ],
)
def test_each_reason(tmp_path, row, kind, fragment):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [chat(), row, chat()])
    report = validate_file(path, "chat", purpose="train")
    assert not report.ok and report.n_bad == 1 and report.n_records == 3
    assert {p.kind for p in report.problems} == {kind}
    assert all(str(p).startswith(f"{path}:2: ") for p in report.problems)
    assert fragment in str(report.problems[0])


def test_undecodable_line_does_not_hide_the_others(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(chat()).encode()
    path.write_bytes(good + b"\n" + good.replace(b'"q"', b'"\xff"') + b"\n" + good + b"\n")
    report = validate_file(path)
    assert [(p.location.line, p.kind) for p in report.problems] == [(2, "undecodable")]
    assert report.summary() == "3 records, 1 bad"


def test_every_bad_record_is_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [chat(), "{oops", chat(user=""), chat(), {"messages": 1}, chat(z=1)])
    report = validate_file(path)
    assert [p.location.line for p in report.problems] == [2, 3, 5, 6]
    assert report.format == "chat" and report.format_detected


def test_ok_summary(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [chat(), chat()])
    report = validate_file(path)
    assert report.ok and report.summary() == "ok: 2 records, format chat" and report.purpose == "train"


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(BadInputError, match="empty file"):
        validate_file(path)


def test_prompt_set_of_final_user_turns_is_valid(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [chat(answer=None), chat(user="other", answer=None)])
    report = validate_file(path)
    assert report.ok and report.purpose == "prompts"
    assert not validate_file(path, purpose="train").ok


def test_mixed_answers_default_to_training_data(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [chat(), chat(answer=None)])
    report = validate_file(path)
    assert report.purpose == "train" and [p.location.line for p in report.problems] == [2]
    assert validate_file(path, purpose="prompts").ok


def test_prompt_format_cannot_be_training_data(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": "p"}])
    assert validate_file(path).format == "prompt"
    with pytest.raises(BadInputError, match="cannot be used as training data"):
        validate_file(path, purpose="train")


def test_other_readers_report_their_locations(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("input,output\nhello,world\n,empty prompt\n")
    report = validate_file(path)
    assert report.format == "input-output"
    assert [str(p) for p in report.problems] == [f"{path}:3: empty content: 'input' is empty or whitespace"]
    jpath = tmp_path / "d.json"
    jpath.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}]))
    assert str(validate_file(jpath).problems[0]).startswith(f"{jpath}:1: item 1: wrong type")


def test_all_lines_unparseable_still_lists_them(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("{\n[\n")
    report = validate_file(path)
    assert report.n_bad == 2 and {p.kind for p in report.problems} == {"malformed-json"}


def test_over_long_records_with_a_tokenizer(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [chat(), chat(user="the quick brown fox " * 40), chat()])
    report = validate_file(path, tokenizer=tiny_tokenizer, max_tokens=64)
    assert [(p.location.line, p.kind) for p in report.problems] == [(2, "too-long")]
    assert "tokens > max 64" in report.problems[0].reason
    assert validate_file(path, tokenizer=tiny_tokenizer, max_tokens=10_000).ok


def test_max_tokens_needs_a_tokenizer(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [chat()])
    with pytest.raises(BadInputError, match="--tokenizer"):
        validate_file(path, max_tokens=5)


def test_load_dataset_file_refuses_a_bad_file_listing_every_problem(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [chat(), "{oops", chat(user="")])
    with pytest.raises(BadInputError) as exc:
        load_dataset_file(path)
    msg = str(exc.value)
    assert f"{path}:2: malformed JSON" in msg and f"{path}:3: empty content" in msg


def test_load_dataset_file_normalises(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": "p", "completion": "c", "id": "x1"}, {"prompt": "q", "completion": "d"}])
    ds = load_dataset_file(path, purpose="train")
    assert (ds.format, ds.purpose, len(ds)) == ("prompt-completion", "train", 2)
    assert ds[0] == {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
                     "source": f"{path}:1", "id": "x1"}
    assert ds.prompts()[1] == [{"role": "user", "content": "q"}]
    assert ds.completions() == ["c", "d"]
    assert ds.originals[0] == {"prompt": "p", "completion": "c", "id": "x1"}


def test_load_template_dataset(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,output\n2+2,4\n")
    ds = load_dataset_file(path, template="Q: {question}\nA:")
    assert ds.format == "template" and ds.completion_field == "output"
    assert ds.messages[0] == [{"role": "user", "content": "Q: 2+2\nA:"}, {"role": "assistant", "content": "4"}]


def test_parquet_chat_with_null_struct_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]},
    ]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)  # arrow fills the missing "name" with null
    report = validate_file(path)
    assert [str(p).split(": ")[0] for p in report.problems] == [f"{path}:row 1"]
    assert report.problems[0].kind == "role-order"


def test_hf_dataset_dict_split(tmp_path):
    from datasets import Dataset, DatasetDict

    good = {"prompt": "p", "completion": "c"}
    DatasetDict({"train": Dataset.from_list([good]), "test": Dataset.from_list([{**good, "completion": " "}])}
                ).save_to_disk(str(tmp_path / "dd"))
    assert validate_file(tmp_path / "dd").ok
    report = validate_file(tmp_path / "dd", split="test")
    assert [str(p) for p in report.problems] == [
        f"{tmp_path / 'dd' / 'test'}:row 0: empty content: 'completion' is empty or whitespace"]
