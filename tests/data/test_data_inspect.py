"""inspect: counts, roles, turns, duplicates and length percentiles."""

from __future__ import annotations

import json

import pytest

from slmops.data import inspect_file, percentiles
from slmops.errors import BadInputError


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


ROWS = [
    {"messages": [msg("system", "s"), msg("user", "hello"), msg("assistant", "hi there")]},
    {"messages": [msg("system", "s"), msg("user", "hello"), msg("assistant", "hi there")]},  # duplicate record
    {"messages": [msg("system", "s"), msg("user", "hello"), msg("assistant", "other")]},  # duplicate prompt
    {"messages": [msg("user", "a"), msg("assistant", "b"), msg("user", "cc"), msg("assistant", "dddd")]},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_percentiles_nearest_rank():
    assert percentiles([]) is None
    assert percentiles([5]) == {"p50": 5, "p90": 5, "p99": 5, "max": 5}
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}


def test_counts_duplicates_and_lengths(data_file):
    stats = inspect_file(data_file)
    assert (stats["records"], stats["format"], stats["purpose"]) == (4, "chat", "train")
    assert stats["messages_per_role"] == {"system": 3, "user": 5, "assistant": 5}
    assert stats["turns"] == {"min": 1, "mean": 1.25, "max": 2, "multi_turn": 1}
    assert stats["duplicates"] == {"prompts": 2, "records": 1}
    # prompt chars: system + user contents (6, 6, 6) and "a"+"b"+"cc" (4)
    assert stats["chars"]["prompt"] == {"p50": 6, "p90": 6, "p99": 6, "max": 6}
    assert stats["chars"]["completion"]["max"] == 8
    assert stats["tokens"] is None
    json.dumps(stats)  # machine-readable


def test_token_lengths_with_a_tokenizer(data_file, tmp_path):
    from slmops.models.tokenizer import save_tokenizer, train_bpe_tokenizer

    save_tokenizer(train_bpe_tokenizer(["hello hi there other"] * 10, vocab_size=300), tmp_path / "tok")
    stats = inspect_file(data_file, tokenizer=tmp_path / "tok")
    assert stats["tokens"]["prompt"]["max"] > stats["chars"]["prompt"]["max"] / 10
    assert stats["tokens"]["completion"]["p50"] >= 1


def test_prompt_set_has_no_completion_stats(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x"}\n{"prompt": "x"}\n')
    stats = inspect_file(path)
    assert stats["purpose"] == "prompts" and stats["chars"]["completion"] is None
    assert stats["duplicates"] == {"prompts": 1, "records": 1}


def test_inspect_refuses_a_bad_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(BadInputError, match="failed validation"):
        inspect_file(path)
