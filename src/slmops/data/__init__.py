"""Data layer: read, validate, normalise, inspect and split datasets.

Typical use by later stages::

    from slmops.data import load_dataset_file

    ds = load_dataset_file("train.jsonl", purpose="train")   # BadInputError lists every bad record
    for row in ds:                                            # {"messages": [...], "source": "train.jsonl:3"}
        ...
    prompts = load_dataset_file("prompts.jsonl", purpose="prompts").prompts()

Formats, detection rules and validation reasons are described in docs/formats.md.
"""

from __future__ import annotations

from slmops.data.dataset import ChatDataset, load_dataset_file
from slmops.data.formats import (
    FORMATS,
    ROLES,
    FormatSpec,
    RecordProblem,
    completion_part,
    detect_format,
    normalise_record,
    prompt_part,
    resolve_spec,
    to_messages,
    to_prompt_messages,
)
from slmops.data.inspect import inspect_dataset, inspect_file, percentiles
from slmops.data.readers import Location, RawRecord, detect_reader, read_records
from slmops.data.split import SplitResult, split_file, split_indices
from slmops.data.tokens import count_tokens, load_tokenizer, render_text
from slmops.data.validate import PURPOSES, Problem, ValidationReport, validate_file

__all__ = [
    "FORMATS",
    "PURPOSES",
    "ROLES",
    "ChatDataset",
    "FormatSpec",
    "Location",
    "Problem",
    "RawRecord",
    "RecordProblem",
    "SplitResult",
    "ValidationReport",
    "completion_part",
    "count_tokens",
    "detect_format",
    "detect_reader",
    "inspect_dataset",
    "inspect_file",
    "load_dataset_file",
    "load_tokenizer",
    "normalise_record",
    "percentiles",
    "prompt_part",
    "read_records",
    "render_text",
    "resolve_spec",
    "split_file",
    "split_indices",
    "to_messages",
    "to_prompt_messages",
    "validate_file",
]
