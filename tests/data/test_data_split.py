"""split: deterministic, proportional, stratified, original records, atomic, careful with out dirs."""

from __future__ import annotations

import json

import pytest

from slmops.data import split_file, split_indices
from slmops.errors import BadInputError


def make_rows(n: int) -> list[dict]:
    return [
        {"prompt": f"question {i}", "completion": f"answer {i}", "metadata": {"task": "ab"[i % 2] if i % 5 else "c"},
         "id": i}
        for i in range(n)
    ]


def write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    write(path, make_rows(100))
    return path


def test_same_seed_gives_byte_identical_files(data_file, tmp_path):
    split_file(data_file, tmp_path / "a", seed=7)
    split_file(data_file, tmp_path / "b", seed=7)
    split_file(data_file, tmp_path / "c", seed=8)
    for name in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()


def test_proportions_and_original_records(data_file, tmp_path):
    result = split_file(data_file, tmp_path / "out", val=0.2, test=0.1)
    assert result.counts == {"train": 70, "val": 20, "test": 10}
    parts = {name: read(tmp_path / "out" / f"{name}.jsonl") for name in ("train", "val", "test")}
    ids = sorted(r["id"] for rows in parts.values() for r in rows)
    assert ids == list(range(100))  # a partition
    assert parts["train"][0] == make_rows(100)[parts["train"][0]["id"]]  # written unchanged
    assert [r["id"] for r in parts["val"]] == sorted(r["id"] for r in parts["val"])  # input order kept
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]


def test_zero_fraction_writes_no_file(data_file, tmp_path):
    result = split_file(data_file, tmp_path / "out", val=0.0, test=0.25)
    assert set(result.paths) == {"train", "test"} and not (tmp_path / "out" / "val.jsonl").exists()


@pytest.mark.parametrize("stratify", ["metadata.task", lambda r: r["id"] % 3])
def test_each_stratum_is_split_in_the_same_proportions(data_file, tmp_path, stratify):
    result = split_file(data_file, tmp_path / "out", val=0.2, test=0.2, stratify=stratify)
    strata = {k for counts in result.strata.values() for k in counts}
    for stratum in strata:
        total = sum(result.strata[name].get(stratum, 0) for name in result.strata)
        for name, frac in (("val", 0.2), ("test", 0.2)):
            assert abs(result.strata[name].get(stratum, 0) - total * frac) <= 0.5


def test_stratify_on_a_top_level_column(tmp_path):
    path = tmp_path / "t.jsonl"  # the template format accepts any columns
    write(path, [{"question": f"q{i}", "output": f"a{i}", "label": "big" if i % 4 == 0 else "small"}
                 for i in range(40)])
    result = split_file(path, tmp_path / "out", val=0.1, test=0.2, stratify="label", template="Q: {question}")
    assert result.strata["test"] == {"big": 2, "small": 6} and result.strata["val"] == {"big": 1, "small": 3}


def test_stratify_on_chat_messages_dotted_path(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"messages": [{"role": "user", "content": "x" if i % 2 else "y"},
                          {"role": "assistant", "content": str(i)}]} for i in range(20)]
    write(path, rows)
    result = split_file(path, tmp_path / "out", val=0.1, test=0.1, stratify="messages.0.content")
    assert result.strata["test"] == {"x": 1, "y": 1}


def test_missing_stratify_field_is_bad_input(data_file, tmp_path):
    with pytest.raises(BadInputError, match="field missing in 100 records"):
        split_file(data_file, tmp_path / "out", stratify="nope")


def test_refuses_non_empty_out_dir_unless_force(data_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(BadInputError, match="not empty"):
        split_file(data_file, out)
    split_file(data_file, out, force=True)
    assert (out / "keep.txt").exists() and (out / "train.jsonl").exists()
    split_file(data_file, out, force=True, val=0)
    assert not (out / "val.jsonl").exists()  # no stale split from the earlier run
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_validates_first(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": 1, "completion": "c"}\n')
    with pytest.raises(BadInputError, match="failed validation"):
        split_file(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_bad_fractions(data_file, tmp_path, val, test):
    with pytest.raises(BadInputError):
        split_file(data_file, tmp_path / "out", val=val, test=test)


def test_too_few_records_for_a_split(tmp_path):
    path = tmp_path / "d.jsonl"
    write(path, make_rows(3))
    with pytest.raises(BadInputError, match="val split would be empty"):
        split_file(path, tmp_path / "out")


def test_split_indices_is_a_pure_function():
    keys = ["a"] * 10 + ["b"] * 30
    first = split_indices(keys, val=0.1, test=0.2, seed=3)
    assert first == split_indices(keys, val=0.1, test=0.2, seed=3)
    assert sum(keys[i] == "a" for i in first["test"]) == 2 and sum(keys[i] == "b" for i in first["test"]) == 6
