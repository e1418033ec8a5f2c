"""Validate a data file: every bad record is reported at once, each as ``file:line: reason``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.data.formats import FormatSpec, normalise_record, resolve_spec
from slmops.data.readers import Location, RawRecord, read_records
from slmops.data.tokens import count_tokens, default_max_tokens, load_tokenizer, render_text
from slmops.errors import BadInputError

PURPOSES = ("auto", "train", "prompts")
TOO_LONG = "too-long"


@dataclass(frozen=True)
class Problem:
    """A problem with one record: where, what kind (e.g. ``missing-field``) and why."""

    location: Location
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


@dataclass
class ValidationReport:
    """The result of validating a file: the resolved format and purpose, the count and the problems.

    ``purpose`` is ``train`` (every record has an answer) or ``prompts`` (answers are optional).
    """

    path: Path
    format: str
    purpose: str
    n_records: int
    problems: list[Problem] = field(default_factory=list)
    format_detected: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def n_bad(self) -> int:
        """Number of bad records (a record with two problems counts once)."""
        return len({str(p.location) for p in self.problems})

    def summary(self) -> str:
        if self.ok:
            return f"ok: {self.n_records} records, format {self.format}"
        return f"{self.n_records} records, {self.n_bad} bad"

    def lines(self) -> list[str]:
        """The report as printed: one ``file:line: reason`` line per problem, then the summary."""
        return [str(p) for p in self.problems] + [self.summary()]


@dataclass
class Scan:
    """A validated file: the report plus, for good records, the messages and the original records."""

    report: ValidationReport
    spec: FormatSpec
    raws: list[RawRecord]
    messages: list[list[dict] | None]


def _resolve_purpose(purpose: str, spec: FormatSpec, records: list[Any]) -> str:
    if purpose not in PURPOSES:
        raise BadInputError(f"unknown purpose {purpose!r}", f"use one of: {', '.join(PURPOSES)}")
    if purpose == "train" and spec.format == "prompt":
        raise BadInputError("format 'prompt' has no answers; it cannot be used as training data")
    if purpose != "auto":
        return purpose
    has_answers = any(isinstance(r, Mapping) and spec.has_completion(r) for r in records)
    return "train" if has_answers else "prompts"


def _too_long(messages: list[list[dict] | None], tokenizer: Any, max_tokens: int | None) -> dict[int, str]:
    """Index -> reason for the good records whose rendered text has more than `max_tokens` tokens."""
    tok = load_tokenizer(tokenizer)
    limit = max_tokens if max_tokens is not None else default_max_tokens(tok)
    good = [i for i, m in enumerate(messages) if m is not None]
    lengths = count_tokens(tok, [render_text(tok, messages[i]) for i in good])  # type: ignore[arg-type]
    return {i: f"too long: {n} tokens > max {limit}" for i, n in zip(good, lengths, strict=True) if n > limit}


def scan_file(
    path: str | Path,
    fmt: str | None = None,
    template: str | None = None,
    completion_field: str | None = None,
    *,
    purpose: str = "auto",
    split: str = "train",
    tokenizer: str | Path | Any | None = None,
    max_tokens: int | None = None,
) -> Scan:
    """Read and check every record of `path`; see :func:`validate_file` for the arguments."""
    path = Path(path)
    if max_tokens is not None and tokenizer is None:
        raise BadInputError("--max-tokens needs --tokenizer PATH")
    raws = list(read_records(path, split=split))
    if not raws:
        raise BadInputError(f"{path}: empty file: no records", "a data file needs at least one record")
    data = [r.data for r in raws if r.error is None]
    if not data and fmt is None and not template:  # nothing parsed: report the read errors
        problems = [Problem(r.location, *r.error) for r in raws if r.error is not None]
        report = ValidationReport(path, "unknown", purpose, len(raws), problems)
        return Scan(report, FormatSpec("prompt"), raws, [None] * len(raws))
    spec = resolve_spec(data, fmt, template, completion_field)
    purpose = _resolve_purpose(purpose, spec, data)
    per_record: list[list[Problem]] = []
    messages: list[list[dict] | None] = []
    for raw in raws:
        if raw.error is not None:
            per_record.append([Problem(raw.location, *raw.error)])
            messages.append(None)
            continue
        msgs, record_problems = normalise_record(raw.data, spec, require_completion=purpose == "train")
        per_record.append([Problem(raw.location, p.kind, p.reason) for p in record_problems])
        messages.append(msgs)
    if tokenizer is not None:
        for i, reason in _too_long(messages, tokenizer, max_tokens).items():
            per_record[i].append(Problem(raws[i].location, TOO_LONG, reason))
    problems = [p for record_problems in per_record for p in record_problems]
    detected = fmt is None and not template
    report = ValidationReport(path, spec.format, purpose, len(raws), problems, detected)
    return Scan(report, spec, raws, messages)


def validate_file(
    path: str | Path,
    fmt: str | None = None,
    template: str | None = None,
    completion_field: str | None = None,
    *,
    purpose: str = "auto",
    split: str = "train",
    tokenizer: str | Path | Any | None = None,
    max_tokens: int | None = None,
) -> ValidationReport:
    """Check every record of `path` and report all problems (never stops at the first).

    - `fmt`: one of ``FORMATS``; detected from the records' keys when None (``template`` if `template`).
    - `template`, `completion_field`: for the ``template`` format (``"...{field}..."``).
    - `purpose`: ``train`` (every record needs an answer), ``prompts`` (answers optional) or ``auto``
      (``train`` if any record has an answer).
    - `split`: the split of a Hugging Face DatasetDict folder.
    - `tokenizer` (a folder or a tokenizer object) and `max_tokens`: flag records whose rendered text is
      longer than `max_tokens` tokens (default: the tokenizer's ``model_max_length``).

    Problems with the file as a whole (not found, unknown extension, empty) raise ``BadInputError``.
    """
    return scan_file(
        path, fmt, template, completion_field,
        purpose=purpose, split=split, tokenizer=tokenizer, max_tokens=max_tokens,
    ).report
