"""Deterministic train/val/test splits, optionally stratified, written atomically as JSONL."""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.data.dataset import load_dataset_file
from slmops.errors import BadInputError

SPLITS = ("train", "val", "test")
Stratify = str | Callable[[Any], Any] | None
_MISSING = object()


@dataclass
class SplitResult:
    """What `split_file` wrote: per split its path and record count, and the records per stratum."""

    paths: dict[str, Path]
    counts: dict[str, int]
    strata: dict[str, dict[str, int]] = field(default_factory=dict)


def get_path(record: Any, dotted: str) -> Any:
    """Follow a dotted path through dicts and lists: ``"metadata.task"``, ``"messages.0.content"``.

    Returns a sentinel (not None) when the path does not exist; see :func:`stratum_key`.
    """
    value = record
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def stratum_key(record: Any, stratify: Stratify) -> str:
    """The stratum of `record` as a string: a field / dotted path of the record, or ``stratify(record)``."""
    if stratify is None:
        return ""
    value = stratify(record) if callable(stratify) else get_path(record, stratify)
    if value is _MISSING:
        raise KeyError(stratify)
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _check_fractions(val: float, test: float) -> None:
    for name, frac in (("val", val), ("test", test)):
        if not 0 <= frac < 1:
            raise BadInputError(f"--{name} must be in [0, 1), got {frac}")
    if val + test >= 1:
        raise BadInputError(f"--val + --test must be below 1, got {val + test}", "leave records for training")


def split_indices(
    keys: Sequence[str], val: float = 0.1, test: float = 0.1, seed: int = 0
) -> dict[str, list[int]]:
    """Assign record indices to train/val/test, each stratum (equal key) in the same proportions.

    Within a stratum the records are shuffled with ``random.Random(seed)`` and the first
    ``round(n * test)`` go to test, the next ``round(n * val)`` to val (halves round up), the rest to
    train. Each split keeps the input order. Same keys, fractions and seed give the same result.
    """
    _check_fractions(val, test)
    rng = random.Random(seed)
    by_stratum: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_stratum.setdefault(key, []).append(i)
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    for key in sorted(by_stratum):
        members = by_stratum[key]
        rng.shuffle(members)
        n_test = math.floor(len(members) * test + 0.5)
        n_val = min(math.floor(len(members) * val + 0.5), len(members) - n_test)
        out["test"] += members[:n_test]
        out["val"] += members[n_test:n_test + n_val]
        out["train"] += members[n_test + n_val:]
    return {name: sorted(idx) for name, idx in out.items()}


def _write_jsonl_atomic(path: Path, records: list[Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"--out {out_dir} is a file, not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise BadInputError(f"output folder {out_dir} is not empty", "pass --force to overwrite its split files")
    out_dir.mkdir(parents=True, exist_ok=True)


def _keys(originals: list[Any], sources: list[str], stratify: Stratify) -> list[str]:
    keys, missing = [], []
    for record, source in zip(originals, sources, strict=True):
        try:
            keys.append(stratum_key(record, stratify))
        except KeyError:
            missing.append(source)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise BadInputError(f"--stratify {stratify!r}: field missing in {len(missing)} records: {shown}")
    return keys


def split_file(
    path: str | Path,
    out_dir: str | Path,
    *,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    stratify: Stratify = None,
    force: bool = False,
    fmt: str | None = None,
    template: str | None = None,
    completion_field: str | None = None,
    purpose: str = "auto",
    split: str = "train",
) -> SplitResult:
    """Validate `path`, then write ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl`` into `out_dir`.

    The ORIGINAL records are written unchanged (one JSON object per line), not the normalised ones.
    `stratify` is a top-level field, a dotted path (``"metadata.task"``, ``"messages.0.role"``) or a
    callable ``record -> value``; each stratum is then split in the same proportions. A split whose
    fraction is 0 is not written; one that would get no records is an error. `out_dir` must be empty
    unless `force`. Files are written to a temporary name and renamed, so a reader never sees half a file.
    The format options are those of :func:`slmops.data.validate_file`.
    """
    _check_fractions(val, test)
    ds = load_dataset_file(path, fmt, template, completion_field, purpose=purpose, split=split)
    keys = _keys(ds.originals, [r["source"] for r in ds.records], stratify)
    assigned = split_indices(keys, val=val, test=test, seed=seed)
    wanted = {"train": 1.0, "val": val, "test": test}
    for name in SPLITS:
        if wanted[name] > 0 and not assigned[name]:
            raise BadInputError(
                f"the {name} split would be empty ({len(ds)} records)",
                "use more data or a larger fraction" if name != "train" else "lower --val / --test",
            )
    out = Path(out_dir)
    _prepare_out_dir(out, force)
    result = SplitResult(paths={}, counts={})
    for name in SPLITS:
        if wanted[name] > 0:
            target = out / f"{name}.jsonl"
            _write_jsonl_atomic(target, [ds.originals[i] for i in assigned[name]])
            result.paths[name], result.counts[name] = target, len(assigned[name])
            if stratify is not None:
                result.strata[name] = dict(sorted(Counter(keys[i] for i in assigned[name]).items()))
        else:
            (out / f"{name}.jsonl").unlink(missing_ok=True)  # a stale file from an earlier --force run
    return result
