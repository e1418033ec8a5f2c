"""Load a validated data file as chat messages: the one entry point for every later stage."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.data.formats import completion_part, prompt_part
from slmops.data.validate import scan_file
from slmops.errors import BadInputError


@dataclass
class ChatDataset:
    """A data file that passed validation, normalised to chat messages.

    - ``records``: one dict per record, ``{"messages": [...], "source": "file:line"}`` (plus ``"id"``
      when the record had one); answers, when present, are the final assistant message.
    - ``originals``: the records exactly as read, in the same order (what ``split`` writes back).
    - ``format``: the resolved format; ``purpose``: ``train`` (all records have answers) or ``prompts``.
    """

    path: Path
    format: str
    purpose: str
    records: list[dict]
    originals: list[Any] = field(repr=False)
    template: str | None = None
    completion_field: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    @property
    def messages(self) -> list[list[dict]]:
        """The messages of every record."""
        return [r["messages"] for r in self.records]

    def prompts(self) -> list[list[dict]]:
        """The prompt of every record: its messages without the final assistant turn."""
        return [prompt_part(r["messages"]) for r in self.records]

    def completions(self) -> list[str | None]:
        """The answer of every record (None for a prompt without one)."""
        return [completion_part(r["messages"]) for r in self.records]


def load_dataset_file(
    path: str | Path,
    fmt: str | None = None,
    template: str | None = None,
    completion_field: str | None = None,
    *,
    purpose: str = "auto",
    split: str = "train",
    tokenizer: str | Path | Any | None = None,
    max_tokens: int | None = None,
) -> ChatDataset:
    """Validate `path` and return it as a :class:`ChatDataset`; BadInputError lists every problem.

    Arguments are those of :func:`slmops.data.validate_file`. Use ``purpose="train"`` for training
    data (every record must end with an answer) and ``purpose="prompts"`` for prompt sets (answers,
    if any, are kept but optional).
    """
    scan = scan_file(
        path, fmt, template, completion_field,
        purpose=purpose, split=split, tokenizer=tokenizer, max_tokens=max_tokens,
    )
    report = scan.report
    if not report.ok:
        raise BadInputError(
            f"{report.path} failed validation ({report.n_bad} bad of {report.n_records} records):\n"
            + "\n".join(str(p) for p in report.problems),
            f"see `slmops data validate {report.path}`",
        )
    records = []
    for raw, messages in zip(scan.raws, scan.messages, strict=True):
        row: dict[str, Any] = {"messages": messages, "source": str(raw.location)}
        if isinstance(raw.data, dict) and raw.data.get("id") is not None:
            row["id"] = raw.data["id"]
        records.append(row)
    return ChatDataset(
        path=Path(path),
        format=report.format,
        purpose=report.purpose,
        records=records,
        originals=[raw.data for raw in scan.raws],
        template=scan.spec.template,
        completion_field=scan.spec.completion_field,
    )
