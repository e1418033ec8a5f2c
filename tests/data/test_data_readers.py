"""Readers: every file kind yields records with their source location."""

from __future__ import annotations

import json

import pytest

from slmops.data import detect_reader, read_records
from slmops.errors import BadInputError, NotFoundError

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def test_jsonl_line_numbers_skip_blank_lines_and_bom(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n\n{"prompt": "b"}\r\n')
    records = list(read_records(path))
    assert [r.data for r in records] == [{"prompt": "a"}, {"prompt": "b"}]
    assert [str(r.location) for r in records] == [f"{path}:1", f"{path}:3"]
    assert [r.location.index for r in records] == [0, 1]


def test_jsonl_bad_lines_do_not_stop_reading(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": \n{"prompt": "caf\xe9"}\n{"prompt": "z"}\n')
    records = list(read_records(path))
    assert [r.location.line for r in records] == [1, 2, 3, 4]
    assert records[1].error[0] == "malformed-json"
    assert records[2].error[0] == "undecodable"
    assert records[3].data == {"prompt": "z"}


def test_json_array_gives_index_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    records = list(read_records(path))
    assert [r.data for r in records] == ROWS
    assert [r.location.index for r in records] == [0, 1]
    assert records[1].location.line == 6
    assert str(records[1].location) == f"{path}:6: item 1"


def test_json_array_malformed_item_is_reported_with_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    records = list(read_records(path))
    assert records[0].data == {"prompt": "a"}
    assert records[1].error[0] == "malformed-json" and records[1].location.line == 3


def test_json_not_an_array_is_bad_input(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"prompt": "a"}')
    with pytest.raises(BadInputError, match="top-level JSON array"):
        list(read_records(path))


def test_csv_header_and_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"two\nlines",x\na,b\nonly-one-field\n', newline="")
    records = list(read_records(path))
    assert records[0].data == {"prompt": "two\nlines", "completion": "x"}
    assert [r.location.line for r in records] == [2, 4, 5]
    assert records[1].data == {"prompt": "a", "completion": "b"}
    assert records[2].error[0] == "malformed-csv"


def test_csv_undecodable_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt\ncaf\xe9\nok\n")
    records = list(read_records(path))
    assert records[0].error[0] == "undecodable" and records[0].location.line == 2
    assert records[1].data == {"prompt": "ok"}


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    records = list(read_records(path))
    assert [r.data for r in records] == ROWS
    assert str(records[1].location) == f"{path}:row 1"


def test_hf_dataset_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert detect_reader(tmp_path / "ds") == "hf"
    records = list(read_records(tmp_path / "ds"))
    assert [r.data for r in records] == ROWS
    assert records[0].location.index == 0


def test_hf_dataset_dict_folder_picks_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert len(list(read_records(tmp_path / "dd"))) == 2
    test = list(read_records(tmp_path / "dd", split="test"))
    assert len(test) == 1 and str(test[0].location) == f"{tmp_path / 'dd' / 'test'}:row 0"
    with pytest.raises(BadInputError, match="available: train, test"):
        list(read_records(tmp_path / "dd", split="validation"))


def test_unknown_extension_names_supported_ones(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(BadInputError) as exc:
        detect_reader(path)
    assert ".jsonl" in str(exc.value) and ".parquet" in str(exc.value)


def test_missing_file_and_plain_folder(tmp_path):
    with pytest.raises(NotFoundError):
        detect_reader(tmp_path / "nope.jsonl")
    with pytest.raises(BadInputError, match="not a Hugging Face dataset folder"):
        detect_reader(tmp_path)
