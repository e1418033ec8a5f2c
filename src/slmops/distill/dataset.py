"""From teacher generations to a training dataset: filter, write, register.

``build_dataset(out_dir, hashes, config)`` filters the rows of ``<out>/generations.jsonl`` (only those of
the current prompts and settings when `hashes` is given) and writes, atomically, into `out_dir`:

- ``train.jsonl``: chat examples ``{"messages": [...prompt..., {"role": "assistant", "content": answer}],
  "metadata": {"agreement", "teachers", "agreeing_teachers", "teacher_votes", "messages_hash",
  "prompt_hashes", "index", "n_samples"}}`` in prompt order (``slmops data validate`` accepts it);
- ``rejected.jsonl``: every rejected prompt with its reason and each sample's own reason;
- ``summary.json``: the generation report, the filter settings and the kept/rejected summary.

``register_dataset`` stores those files (with only the generation rows used) as a ``dataset`` artifact in
the workspace, the teachers that are workspace artifacts as its parents; running it again on unchanged
results returns the artifact already registered.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from slmops.distill.filters import FilterConfig, FilterOutcome, filter_rows
from slmops.distill.generate import GENERATIONS, SUMMARY, _write_json, canonical_json, read_rows

TRAIN = "train.jsonl"
REJECTED = "rejected.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_dataset(out_dir: str | Path, hashes: list[str] | set[str] | None = None,
                  config: FilterConfig | None = None) -> FilterOutcome:
    """Filter the generations in `out_dir` and write train.jsonl, rejected.jsonl and the summary."""
    out = Path(out_dir)
    config = config or FilterConfig()
    rows = read_rows(out / GENERATIONS, set(hashes) if hashes is not None else None)
    outcome = filter_rows(rows, config)
    _write_jsonl(out / TRAIN, outcome.kept)
    _write_jsonl(out / REJECTED, outcome.rejected)
    _write_json(out / SUMMARY, {"filters": outcome.summary, "filter_config": config.to_dict()})
    return outcome


def _digest(out: Path, config: dict) -> str:
    h = hashlib.sha256(canonical_json(config).encode())
    for name in (TRAIN, REJECTED):
        h.update((out / name).read_bytes())
    return h.hexdigest()


def register_dataset(workspace, out_dir: str | Path, *, name: str | None = None,
                     config: dict[str, Any] | None = None, parents: list[str] | None = None,
                     hashes: list[str] | None = None) -> tuple[Any, bool]:
    """Register the built dataset in `out_dir` as a workspace artifact: ``(manifest, created)``;
    `created` is False when the same results were registered before (that artifact is returned)."""
    out = Path(out_dir)
    config = dict(config or {})
    summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    digest = _digest(out, config)
    previous = summary.get("artifact") or {}
    if previous.get("digest") == digest and previous.get("id"):
        try:
            return workspace.manifest(previous["id"]), False
        except Exception:  # noqa: BLE001 - removed since: register again
            pass
    rows = read_rows(out / GENERATIONS, set(hashes) if hashes is not None else None)
    metrics = {"examples": summary.get("filters", {}).get("kept"), "filters": summary.get("filters", {}),
               "generation": summary.get("generation", {})}
    with workspace.create_artifact("dataset", name or f"distill-{out.resolve().name}", config=config,
                                   parents=parents, metrics=metrics) as w:
        for fname in (TRAIN, REJECTED):
            (w.path / fname).write_bytes((out / fname).read_bytes())
        _write_jsonl(w.path / GENERATIONS, sorted(rows, key=lambda r: (r.get("index", 0), r["teacher"])))
        (w.path / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        art_id = w.id
    _write_json(out / SUMMARY, {"artifact": {"id": art_id, "digest": digest}})
    return workspace.manifest(art_id), True
