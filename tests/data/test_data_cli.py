"""`slmops data validate|inspect|split` through the real CLI entry point (`run`)."""

from __future__ import annotations

import importlib
import json

import pytest


@pytest.fixture
def cli():
    """`run(argv) -> exit code` through the real CLI entry point."""
    return importlib.import_module("slmops.cli.app").run


def chat(user: str = "q", answer: str = "a") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_validate_lists_six_kinds_of_bad_records_and_exits_2(tmp_path, cli, capsys):
    good = json.dumps(chat()).encode()
    lines = [
        good,                                                              # 1 ok
        b'{"messages": [{"role": "user", "content": "q"}',                 # 2 malformed JSON
        json.dumps({"id": 7}).encode(),                                    # 3 missing field
        json.dumps({**chat(), "source": "web"}).encode(),                  # 4 unknown field
        good,                                                              # 5 ok
        json.dumps({"messages": [{"role": "user", "content": 42},
                                 {"role": "assistant", "content": "a"}]}).encode(),  # 6 wrong type
        json.dumps(chat(answer=" ")).encode(),                             # 7 empty content
        json.dumps({"messages": [{"role": "user", "content": "q"},
                                 {"role": "user", "content": "q2"}]}).encode(),      # 8 bad role order
        good.replace(b'"q"', b'"\xc3\x28"'),                               # 9 undecodable bytes
        good,                                                              # 10 ok
    ]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rc = cli(["data", "validate", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2
    expected = {
        2: "malformed JSON", 3: "missing required field 'messages'", 4: "unknown field 'source'",
        6: "wrong type", 7: "empty content", 8: "bad role order", 9: "undecodable bytes",
    }
    for line, reason in expected.items():
        assert f"{path}:{line}: {reason}" in out
    assert not any(f"{path}:{n}:" in out for n in (1, 5, 10))
    assert (out + err).rstrip().endswith("10 records, 7 bad")


def test_validate_ok(tmp_path, cli, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat()) + "\n" + json.dumps(chat("q2")) + "\n")
    assert cli(["data", "validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "ok: 2 records, format chat"
    assert "format: chat (detected)" in err


def test_validate_too_long_with_tokenizer(tmp_path, cli, capsys):
    from slmops.models.tokenizer import save_tokenizer, train_bpe_tokenizer

    save_tokenizer(train_bpe_tokenizer(["some words to learn"] * 10, vocab_size=300), tmp_path / "tok")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat()) + "\n" + json.dumps(chat("some words " * 50)) + "\n")
    rc = cli(["data", "validate", str(path), "--tokenizer", str(tmp_path / "tok"), "--max-tokens", "40"])
    assert rc == 2
    assert f"{path}:2: too long:" in capsys.readouterr().out


def test_unknown_extension_exits_2(tmp_path, cli, capsys):
    path = tmp_path / "d.txt"
    path.write_text("x")
    assert cli(["data", "validate", str(path)]) == 2
    assert ".jsonl" in capsys.readouterr().err


def test_inspect_json(tmp_path, cli, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text((json.dumps({"prompt": "p", "completion": "c"}) + "\n") * 3)
    assert cli(["data", "inspect", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 3 and stats["format"] == "prompt-completion"
    assert stats["duplicates"] == {"prompts": 2, "records": 2}


def test_inspect_table(tmp_path, cli, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat()) + "\n")
    assert cli(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "duplicate prompts" in out and "prompt chars" in out


def test_split_and_refuse_non_empty_out(tmp_path, cli, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(chat(f"q{i}")) + "\n" for i in range(20)))
    out = tmp_path / "out"
    assert cli(["data", "split", str(path), "--out", str(out), "--val", "0.1", "--test", "0.2", "--seed", "1"]) == 0
    assert [len((out / f"{n}.jsonl").read_text().splitlines()) for n in ("train", "val", "test")] == [14, 2, 4]
    assert cli(["data", "split", str(path), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli(["data", "split", str(path), "--out", str(out), "--force"]) == 0
