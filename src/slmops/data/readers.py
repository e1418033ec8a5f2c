"""Read records from JSONL, JSON, CSV, Parquet files and local Hugging Face dataset folders.

Every record carries its :class:`Location` so that problems can be reported as ``file:line: reason``.
Readers never stop at a bad record: a line that is not valid JSON or not valid UTF-8 becomes a
:class:`RawRecord` with ``error`` set, and the next line is read as usual. Only problems with the file
as a whole (missing, unknown extension, not a JSON array, unreadable Parquet) raise ``BadInputError``.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, NotFoundError

# problem kinds raised while reading (see formats.py for the others)
MALFORMED_JSON = "malformed-json"
MALFORMED_CSV = "malformed-csv"
UNDECODABLE = "undecodable"

READERS: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".ndjson"),
    "json": (".json",),
    "csv": (".csv",),
    "parquet": (".parquet", ".pq"),
}
SUPPORTED = "JSONL (.jsonl, .ndjson), JSON array (.json), CSV (.csv), Parquet (.parquet, .pq), " \
    "or a Hugging Face dataset folder (saved with save_to_disk)"


@dataclass(frozen=True)
class Location:
    """Where a record comes from: a 1-based ``line`` for text files, a 0-based ``index`` for rows.

    ``str(location)`` is ``file:12`` (JSONL, CSV), ``file:3: item 1`` (JSON array: line and index) or
    ``file:row 7`` (Parquet, Hugging Face datasets; the index as in ``dataset[7]``). For a DatasetDict
    folder the source is ``folder/split``, where ``save_to_disk`` keeps that split.
    """

    source: str
    line: int | None
    index: int
    show_index: bool = False

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.source}:row {self.index}"
        if self.show_index:
            return f"{self.source}:{self.line}: item {self.index}"
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class RawRecord:
    """One record as read: ``data`` (None when it could not be parsed), ``error`` = (kind, reason)."""

    data: Any
    location: Location
    error: tuple[str, str] | None = None


def detect_reader(path: str | Path) -> str:
    """Name the reader for `path`: ``jsonl``, ``json``, ``csv``, ``parquet`` or ``hf`` (a folder)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"data file not found: {path}", "check the path")
    if path.is_dir():
        markers = ("dataset_dict.json", "dataset_info.json", "state.json")
        if any((path / m).exists() for m in markers):
            return "hf"
        raise BadInputError(
            f"{path} is a folder but not a Hugging Face dataset folder (no {', '.join(markers)})",
            f"supported inputs: {SUPPORTED}",
        )
    suffix = path.suffix.lower()
    for name, suffixes in READERS.items():
        if suffix in suffixes:
            return name
    raise BadInputError(f"unknown data file extension {suffix or '(none)'!r}: {path}", f"supported: {SUPPORTED}")


def read_records(path: str | Path, split: str = "train") -> Iterator[RawRecord]:
    """Yield every record of `path` with its location; `split` picks the split of a DatasetDict folder."""
    path = Path(path)
    kind = detect_reader(path)
    if kind == "jsonl":
        return _read_jsonl(path)
    if kind == "json":
        return _read_json(path)
    if kind == "csv":
        return _read_csv(path)
    if kind == "parquet":
        return _read_parquet(path)
    return _read_hf(path, split)


def _undecodable(raw: bytes, exc: UnicodeDecodeError) -> tuple[str, str]:
    return UNDECODABLE, f"undecodable bytes: invalid UTF-8 at byte {exc.start} of the line ({raw[exc.start:exc.start + 4]!r})"


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    source = str(path)
    index = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            loc = Location(source, lineno, index)
            index += 1
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(None, loc, _undecodable(raw, exc))
                continue
            try:
                yield RawRecord(json.loads(text), loc)
            except json.JSONDecodeError as exc:
                yield RawRecord(None, loc, (MALFORMED_JSON, f"malformed JSON: {exc.msg} (column {exc.colno})"))


def _decode_keeping_offsets(path: Path) -> str:
    """Decode UTF-8, turning each invalid byte into a lone surrogate so positions and lines survive."""
    return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


class _LineIndex:
    """Map character offsets to 1-based line numbers."""

    def __init__(self, text: str):
        self._starts = [i for i, ch in enumerate(text) if ch == "\n"]

    def line(self, offset: int) -> int:
        return bisect.bisect_left(self._starts, offset) + 1


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_json(path: Path) -> Iterator[RawRecord]:
    source = str(path)
    text = _decode_keeping_offsets(path)
    lines = _LineIndex(text)
    i = _skip_ws(text, 0)
    if i >= len(text):
        return
    if text[i] != "[":
        raise BadInputError(
            f"{source}:{lines.line(i)}: expected a top-level JSON array of objects",
            "for one JSON object per line, name the file .jsonl",
        )
    decoder = json.JSONDecoder()
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return
    index = 0
    while True:
        loc = Location(source, lines.line(i), index, show_index=True)
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            loc = Location(source, lines.line(exc.pos), index, show_index=True)
            yield RawRecord(None, loc, (MALFORMED_JSON, f"malformed JSON: {exc.msg} (column {exc.colno})"))
            return
        if _has_surrogate(text[i:end]):
            yield RawRecord(None, loc, (UNDECODABLE, "undecodable bytes: invalid UTF-8 in this item"))
        else:
            yield RawRecord(obj, loc)
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i, index = _skip_ws(text, i + 1), index + 1
            continue
        if i < len(text) and text[i] == "]" and _skip_ws(text, i + 1) == len(text):
            return
        end_loc = Location(source, lines.line(min(i, len(text))), index, show_index=True)
        yield RawRecord(None, end_loc, (MALFORMED_JSON, "malformed JSON: expected ',' or ']' after an item"))
        return


def _read_csv(path: Path) -> Iterator[RawRecord]:
    source = str(path)
    reader = csv.reader(io.StringIO(_decode_keeping_offsets(path), newline=""))
    header: list[str] | None = None
    last_line = 0
    index = 0
    for row in reader:
        start, last_line = last_line + 1, reader.line_num
        if not row:  # blank line
            continue
        if header is None:
            header = row
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise BadInputError(f"{source}:{start}: duplicate column names in the header: {', '.join(dupes)}")
            continue
        loc = Location(source, start, index)
        index += 1
        if len(row) != len(header):
            yield RawRecord(None, loc, (MALFORMED_CSV, f"malformed CSV: expected {len(header)} fields, got {len(row)}"))
        elif any(_has_surrogate(value) for value in row):
            yield RawRecord(None, loc, (UNDECODABLE, "undecodable bytes: invalid UTF-8 in this row"))
        else:
            yield RawRecord(dict(zip(header, row, strict=True)), loc)


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise BadInputError(f"{source}: not a readable Parquet file: {exc}") from exc
    index = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield RawRecord(row, Location(source, None, index))
            index += 1


def _read_hf(path: Path, split: str) -> Iterator[RawRecord]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise BadInputError(f"{path}: cannot load the Hugging Face dataset folder: {exc}") from exc
    source = str(path)
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise BadInputError(
                f"{path}: no split {split!r}; available: {', '.join(ds.keys())}", "pick one with --split"
            )
        ds, source = ds[split], str(path / split)  # save_to_disk keeps each split in that subfolder
    for index, row in enumerate(ds):
        yield RawRecord(row, Location(source, None, index))
