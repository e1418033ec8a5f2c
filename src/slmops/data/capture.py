"""Captured traffic -> the next distillation's prompt file: the feedback loop from production to training.

``slmops serve --capture FILE`` appends one JSON line per answered request (see `slmops.serve.capture`):
chat requests as ``{"messages": [..., {"role": "assistant", ...}], "metadata": {...}}`` and text completions
as ``{"prompt", "completion", "metadata"}``. :func:`prompts_from_capture` turns such files into a prompt file
that ``slmops distill generate --prompts`` reads (chat format without the answer)::

    {"messages": [{"role": "system", ...}?, {"role": "user", "content": ...}, ...], "metadata": {...}}

Steps, in order:

1. read every line (a torn or malformed line, or a record of neither shape, is skipped and counted);
   with `model`, keep only records whose ``metadata.model`` matches;
2. redact: the built-in ``pii`` masks e-mail addresses and phone/card-like numbers (the same hook as
   ``serve --capture-redact``), ``module:function`` runs the user's own (None from it drops the record),
   ``none`` keeps the text as captured;
3. keep the prompt: the messages without the final assistant answer (a completion record's prompt becomes
   one user message); records whose prompt is not valid chat (role order, empty content) are skipped;
4. de-duplicate: exact duplicates after normalisation (whitespace collapsed, case folded, every message
   with its role) are merged, keeping the first and counting requests; then near duplicates, whose
   character 5-gram Jaccard similarity to an earlier kept prompt is at least `near_dup_threshold`
   (MinHash LSH candidates, exact check: :func:`slmops.distill.filters.near_duplicates`);
5. drift, when training prompts are given (:func:`drift_summary`).

**The drift measure.** A prompt's text for comparison is its user messages joined by newlines (system
prompts left out: servers often add their own). Its *similarity to the training data* is the largest
Jaccard similarity between its set of character 5-grams (normalised text) and that of any training prompt,
computed exactly (an inverted index over the training prompts' 5-grams). A captured prompt is *unlike* the
training data when that similarity is below `min_similarity` (default 0.3, calibrated in docs/operations.md). The summary reports the share
of unlike prompts among the distinct captured prompts (after exact de-duplication, before near-duplicate
removal) and weighted by requests (``share_unlike_requests``), the threshold, counts, the similarity
distribution and the least similar prompts as examples (redacted, with their nearest training prompt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, NotFoundError

log = logging.getLogger(__name__)

DEFAULT_MIN_SIMILARITY = 0.3
DEFAULT_NEAR_DUP = 0.9
SHINGLE = 5
N_EXAMPLES = 5

# reasons a captured record is skipped
SKIP_MALFORMED = "malformed"
SKIP_UNKNOWN_SHAPE = "unknown-shape"
SKIP_INVALID = "invalid-prompt"
SKIP_REDACTED = "dropped-by-redactor"
SKIP_HOOK_ERROR = "redactor-error"
SKIP_OTHER_MODEL = "other-model"


@dataclass
class DriftSummary:
    """How many captured prompts are unlike the training prompts (see the module docstring)."""

    measure: str
    min_similarity: float
    shingle_size: int
    captured: int  # distinct captured prompts compared
    requests: int  # captured requests they stand for
    training_prompts: int  # distinct training prompts
    unlike: int
    share_unlike: float
    unlike_requests: int
    share_unlike_requests: float
    similarity: dict[str, float]  # min, p25, median, mean, p75, max
    examples: list[dict[str, Any]] = field(default_factory=list)  # {"prompt", "similarity", "nearest", "requests"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CaptureResult:
    """What :func:`prompts_from_capture` read, dropped and wrote."""

    out: Path
    drift_path: Path
    files: list[str]
    records: int  # lines read
    skipped: dict[str, int]  # reason -> records
    redaction: str
    redacted: int  # records whose prompt the redactor changed (duplicates included)
    exact_duplicates: int
    near_duplicates: int
    written: int
    near_dup_threshold: float | None
    drift: DriftSummary | None = None
    train_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"], d["drift_path"] = str(self.out), str(self.drift_path)
        return d


def drift_path_for(out: str | Path) -> Path:
    """Where the drift summary of prompt file `out` goes: ``<out>.drift.json`` (``prompts.jsonl.drift.json``)."""
    out = Path(out)
    return out.with_name(out.name + ".drift.json")


def resolve_redactor(spec: str | None) -> tuple[str, Callable[[dict], dict | None] | None]:
    """``(name, hook)`` for ``pii`` (the default), ``none`` or ``module:function``."""
    from slmops.serve.capture import load_redactor

    spec = (spec or "pii").strip()
    if spec.lower() == "none":
        return "none", None
    try:
        return spec, load_redactor(spec)
    except BadInputError as exc:
        raise BadInputError(exc.message.replace("--capture-redact", "--redact"),
                            "use --redact pii, --redact none or --redact mymodule:myfunction") from None


def comparison_text(messages: Sequence[dict]) -> str:
    """The text a prompt is compared by for drift: its user messages, joined by newlines."""
    return "\n".join(m["content"] for m in messages if m.get("role") == "user")


def _prompt_key(messages: Sequence[dict]) -> str:
    from slmops.distill.filters import normalise_text

    text = "\x1e".join(f"{m['role']}\x1f{normalise_text(m['content'])}" for m in messages)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _to_prompt(record: Any) -> tuple[list[dict] | None, str | None]:
    """The prompt messages of one capture record, or ``(None, skip reason)``."""
    from slmops.data.formats import FormatSpec, normalise_record, prompt_part

    if not isinstance(record, dict):
        return None, SKIP_UNKNOWN_SHAPE
    if isinstance(record.get("messages"), list):
        spec, data = FormatSpec("chat"), {"messages": record["messages"]}
    elif isinstance(record.get("prompt"), str):
        spec, data = FormatSpec("prompt-completion"), {"prompt": record["prompt"],
                                                        "completion": record.get("completion") or None}
        if "system" in record:
            data["system"] = record["system"]
    else:
        return None, SKIP_UNKNOWN_SHAPE
    messages, problems = normalise_record(data, spec)
    if messages is None:
        return None, SKIP_INVALID
    messages = prompt_part(messages)
    if not messages or messages[-1]["role"] != "user":
        return None, SKIP_INVALID
    return [{"role": m["role"], "content": m["content"]} for m in messages], None


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class TrainingIndex:
    """Exact largest character-n-gram Jaccard similarity of a text to any of a set of training texts.

    An inverted index maps each n-gram to the training texts holding it; for a query, the postings of its
    n-grams are concatenated and counted (numpy), which gives every intersection size at once.
    """

    def __init__(self, texts: Iterable[str], n: int = SHINGLE):
        import numpy as np

        from slmops.distill.filters import normalise_text, shingles

        self.n = n
        self.texts: list[str] = []
        seen: set[str] = set()
        for t in texts:
            key = normalise_text(t)
            if key not in seen:
                seen.add(key)
                self.texts.append(t)
        postings: dict[str, list[int]] = {}
        sizes = []
        for i, t in enumerate(self.texts):
            sh = shingles(t, n)
            sizes.append(len(sh))
            for s in sh:
                postings.setdefault(s, []).append(i)
        self._postings = {s: np.asarray(ids, dtype=np.int64) for s, ids in postings.items()}
        self._sizes = np.asarray(sizes, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.texts)

    def nearest(self, text: str) -> tuple[float, int | None]:
        """``(similarity, index of the most similar training text)``; ``(0.0, None)`` when nothing is shared."""
        import numpy as np

        from slmops.distill.filters import shingles

        if not self.texts:
            return 0.0, None
        sh = shingles(text, self.n)
        hits = [self._postings[s] for s in sh if s in self._postings]
        if not hits:
            return 0.0, None
        inter = np.bincount(np.concatenate(hits), minlength=len(self.texts)).astype(np.float64)
        jac = inter / (len(sh) + self._sizes - inter)
        best = int(np.argmax(jac))
        return float(jac[best]), best


def drift_summary(captured: Sequence[str], training: Sequence[str] | TrainingIndex,
                  min_similarity: float = DEFAULT_MIN_SIMILARITY, *, weights: Sequence[int] | None = None,
                  n_examples: int = N_EXAMPLES, shingle_size: int = SHINGLE) -> tuple[DriftSummary, list[float]]:
    """Compare captured prompt texts with training prompt texts; ``(summary, similarity of each captured)``.

    `weights` are the requests each captured text stands for (default 1 each).
    """
    if not 0 <= min_similarity <= 1:
        raise BadInputError(f"--min-similarity must be in [0, 1], got {min_similarity}")
    index = training if isinstance(training, TrainingIndex) else TrainingIndex(training, shingle_size)
    weights = list(weights) if weights is not None else [1] * len(captured)
    sims, nearest = [], []
    for text in captured:
        s, j = index.nearest(text)
        sims.append(round(s, 6))
        nearest.append(j)
    unlike = [i for i, s in enumerate(sims) if s < min_similarity]
    total_req = sum(weights)
    unlike_req = sum(weights[i] for i in unlike)
    ordered = sorted(sims)
    examples = [{"prompt": captured[i], "similarity": sims[i], "requests": weights[i],
                 "nearest": index.texts[nearest[i]] if nearest[i] is not None else None}
                for i in sorted(unlike, key=lambda i: (sims[i], i))[:n_examples]]
    summary = DriftSummary(
        measure=(f"largest Jaccard similarity of character {index.n}-grams (normalised text of the user messages) "
                 f"to any training prompt; unlike = below {min_similarity:g}"),
        min_similarity=min_similarity, shingle_size=index.n, captured=len(captured), requests=total_req,
        training_prompts=len(index), unlike=len(unlike),
        share_unlike=round(len(unlike) / len(captured), 4) if captured else 0.0,
        unlike_requests=unlike_req, share_unlike_requests=round(unlike_req / total_req, 4) if total_req else 0.0,
        similarity={"min": ordered[0] if ordered else 0.0, "p25": round(_percentile(ordered, 0.25), 4),
                    "median": round(_percentile(ordered, 0.5), 4),
                    "mean": round(sum(ordered) / len(ordered), 4) if ordered else 0.0,
                    "p75": round(_percentile(ordered, 0.75), 4), "max": ordered[-1] if ordered else 0.0},
        examples=examples,
    )
    return summary, sims


def load_training_prompts(path: str | Path) -> list[str]:
    """The comparison texts of a training or prompt file (any format `slmops data` reads)."""
    from slmops.data import load_dataset_file

    return [comparison_text(p) for p in load_dataset_file(path, purpose="prompts").prompts()]


def prompts_from_capture(
    files: Sequence[str | Path],
    out: str | Path,
    *,
    train: str | Path | Sequence[str | Path] | None = None,
    redact: str | None = "pii",
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    near_dup_threshold: float | None = DEFAULT_NEAR_DUP,
    model: str | None = None,
    drift_out: str | Path | None = None,
) -> CaptureResult:
    """Turn capture files into a prompt file for ``distill generate`` (see the module docstring).

    Writes `out` (atomically) and the drift summary ``<out>.drift.json`` (or `drift_out`): the whole
    :class:`CaptureResult` as JSON, ``drift`` null without `train`. BadInputError when a file is missing or
    no prompt is left.
    """
    from slmops.data.readers import _read_jsonl

    if not files:
        raise BadInputError("no capture files given", "slmops data from-capture capture.jsonl --out prompts.jsonl")
    if near_dup_threshold is not None and near_dup_threshold <= 0:
        near_dup_threshold = None
    if near_dup_threshold is not None and near_dup_threshold > 1:
        raise BadInputError(f"--near-dup-threshold must be in (0, 1] (0 turns it off), got {near_dup_threshold}")
    if not 0 <= min_similarity <= 1:
        raise BadInputError(f"--min-similarity must be in [0, 1], got {min_similarity}")
    out = Path(out)
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise NotFoundError(f"capture file not found: {p}", "the file `slmops serve --capture FILE` writes")
    train_paths = [Path(train)] if isinstance(train, str | Path) else [Path(t) for t in train or []]
    training = [t for p in train_paths for t in load_training_prompts(p)]  # fail early on a bad train file
    redact_name, hook = resolve_redactor(redact)

    skipped: dict[str, int] = {}
    records = redacted = exact_dups = 0
    kept: list[dict] = []  # {"messages", "metadata"}
    by_key: dict[str, dict] = {}
    for path in paths:
        for raw in _read_jsonl(path):
            records += 1
            if raw.error is not None:
                skipped[SKIP_MALFORMED] = skipped.get(SKIP_MALFORMED, 0) + 1
                continue
            record = raw.data
            if model is not None:
                meta = record.get("metadata") if isinstance(record, dict) else None
                if not isinstance(meta, dict) or meta.get("model") != model:
                    skipped[SKIP_OTHER_MODEL] = skipped.get(SKIP_OTHER_MODEL, 0) + 1
                    continue
            original = record
            if hook is not None and isinstance(record, dict):
                try:
                    record = hook(json.loads(json.dumps(record)))
                except Exception:  # noqa: BLE001 - as in `serve --capture`: a failing hook drops the record
                    log.exception("the redaction hook failed on %s; record dropped", raw.location)
                    skipped[SKIP_HOOK_ERROR] = skipped.get(SKIP_HOOK_ERROR, 0) + 1
                    continue
                if record is None:
                    skipped[SKIP_REDACTED] = skipped.get(SKIP_REDACTED, 0) + 1
                    continue
            messages, reason = _to_prompt(record)
            if messages is None:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            if record is not original and messages != _to_prompt(original)[0]:
                redacted += 1
            key = _prompt_key(messages)
            if key in by_key:
                by_key[key]["metadata"]["requests"] += 1
                exact_dups += 1
                continue
            row = {"messages": messages, "metadata": {"source": str(raw.location), "requests": 1}}
            by_key[key] = row
            kept.append(row)
    if not kept:
        shown = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) or "the files are empty"
        raise BadInputError(f"no prompts in {len(paths)} capture file(s) ({records} records: {shown})",
                            "point at the JSONL that `slmops serve --capture FILE` writes")

    drift = None
    if training:
        drift, sims = drift_summary([comparison_text(r["messages"]) for r in kept], training, min_similarity,
                                    weights=[r["metadata"]["requests"] for r in kept])
        for row, s in zip(kept, sims, strict=True):
            row["metadata"]["train_similarity"] = s

    near = 0
    if near_dup_threshold is not None and len(kept) > 1:
        from slmops.distill.filters import _prompt_text, near_duplicates

        dups = near_duplicates([_prompt_text(r["messages"]) for r in kept], near_dup_threshold, SHINGLE)
        for i, j in dups.items():
            kept[j]["metadata"]["requests"] += kept[i]["metadata"]["requests"]
        near = len(dups)
        kept = [r for i, r in enumerate(kept) if i not in dups]

    _write_lines(out, (json.dumps(r, ensure_ascii=False) for r in kept))
    result = CaptureResult(
        out=out, drift_path=Path(drift_out) if drift_out else drift_path_for(out), files=[str(p) for p in paths],
        records=records, skipped=dict(sorted(skipped.items())), redaction=redact_name, redacted=redacted,
        exact_duplicates=exact_dups, near_duplicates=near, written=len(kept), near_dup_threshold=near_dup_threshold,
        drift=drift, train_file=", ".join(str(p) for p in train_paths) or None,
    )
    _write_lines(result.drift_path, [json.dumps(result.to_dict(), indent=2, ensure_ascii=False)])
    return result


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = [
    "DEFAULT_MIN_SIMILARITY",
    "DEFAULT_NEAR_DUP",
    "CaptureResult",
    "DriftSummary",
    "TrainingIndex",
    "comparison_text",
    "drift_path_for",
    "drift_summary",
    "load_training_prompts",
    "prompts_from_capture",
    "resolve_redactor",
]
