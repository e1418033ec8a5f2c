"""Checks and filters on teacher outputs before they become training data.

Input: generation rows (one per prompt and teacher, each with K samples; see `slmops.distill.generate`).
Rows of the same prompt from several teachers are pooled. For each prompt:

1. every sample is checked, in this order, and rejected with the first reason that applies: ``empty``,
   ``truncated`` (the teacher hit max tokens), ``invalid-json``, ``schema-mismatch``, ``regex-mismatch``,
   ``too-short`` / ``too-long`` (characters, and tokens when a tokenizer is given), ``refusal``;
2. the samples that pass vote (self-consistency across K samples, and across teachers): answers are
   compared normalised (JSON parsed and re-serialised canonically; text with whitespace collapsed and
   case folded); the most common wins (ties: the earliest sample). ``agreement`` is the share of *all*
   the prompt's samples that agree with the winner (a sample rejected in step 1 counts as disagreeing);
   below ``min_agreement`` the prompt is rejected as ``low-agreement``. The teachers with at least one
   sample in the winning group are recorded as agreeing;
3. a prompt none of whose samples passed is rejected with its samples' most common reason;
4. kept examples are de-duplicated in prompt order: ``duplicate`` when the normalised prompt and answer
   equal an earlier example's, ``near-duplicate`` when the prompt's character-shingle Jaccard similarity
   to an earlier kept prompt is at least ``near_dup_threshold`` (see :func:`near_duplicates`).

:func:`apply_filters` returns the kept chat examples and a summary ``{"total", "kept", "rejected":
{reason: count}, ...}``; :func:`filter_rows` also returns the rejected prompts with every sample's reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError

DEFAULT_REFUSALS: tuple[str, ...] = (
    "I'm sorry", "I am sorry", "I apologize", "I cannot", "I can't", "I can not", "I'm unable to",
    "I am unable to", "I'm not able to", "I am not able to", "I won't be able to", "As an AI",
    "as a language model", "as an AI language model",
)
REFUSAL_WINDOW = 200  # refusal phrases are looked for in the first characters of an answer

# sample-level reasons, in the order they are checked
EMPTY = "empty"
TRUNCATED = "truncated"
INVALID_JSON = "invalid-json"
SCHEMA_MISMATCH = "schema-mismatch"
REGEX_MISMATCH = "regex-mismatch"
TOO_SHORT = "too-short"
TOO_LONG = "too-long"
REFUSAL = "refusal"
# prompt-level reasons
LOW_AGREEMENT = "low-agreement"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near-duplicate"
SAMPLE_REASONS = (EMPTY, TRUNCATED, INVALID_JSON, SCHEMA_MISMATCH, REGEX_MISMATCH, TOO_SHORT, TOO_LONG, REFUSAL)
REASONS = (*SAMPLE_REASONS, LOW_AGREEMENT, DUPLICATE, NEAR_DUPLICATE)


@dataclass
class FilterConfig:
    """What to check. `json_schema` (a dict, or a path to a JSON file) implies `json_valid`.
    `tokenizer` (a folder, a Hugging Face tokenizer, or a callable text -> token count) enables the
    token bounds."""

    json_valid: bool = False
    json_schema: dict | str | Path | None = None
    regex: str | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    tokenizer: Any = None
    refusals: bool = True
    refusal_phrases: tuple[str, ...] = DEFAULT_REFUSALS
    drop_truncated: bool = True
    dedup: bool = True
    near_dup_threshold: float | None = None
    shingle_size: int = 5
    min_agreement: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, str | Path):
            path = Path(self.json_schema)
            if not path.exists():
                raise BadInputError(f"JSON schema file not found: {path}")
            try:
                self.json_schema = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise BadInputError(f"{path} is not valid JSON: {exc}") from exc
        if self.json_schema is not None:
            self.json_valid = True
            from jsonschema import Draft202012Validator, SchemaError, validators

            try:
                validators.validator_for(self.json_schema, default=Draft202012Validator).check_schema(
                    self.json_schema)
            except SchemaError as exc:
                raise BadInputError(f"bad JSON schema: {exc.message}") from exc
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise BadInputError(f"bad --regex {self.regex!r}: {exc}") from exc
        for name in ("min_chars", "max_chars", "min_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise BadInputError(f"{name} must be >= 0, got {value}")
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise BadInputError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")
        if (self.min_tokens is not None or self.max_tokens is not None) and self.tokenizer is None:
            raise BadInputError("token length bounds need a tokenizer", "pass --tokenizer DIR")
        if self.near_dup_threshold is not None and not 0 < self.near_dup_threshold <= 1:
            raise BadInputError(f"near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise BadInputError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.shingle_size < 1:
            raise BadInputError(f"shingle_size must be >= 1, got {self.shingle_size}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON (the tokenizer by name), for manifests."""
        out = asdict(self) if self.tokenizer is None else {
            k: v for k, v in self.__dict__.items() if k != "tokenizer"}
        out["tokenizer"] = (str(self.tokenizer) if isinstance(self.tokenizer, str | Path)
                            else getattr(self.tokenizer, "name_or_path", None) if self.tokenizer is not None
                            else None)
        out["refusal_phrases"] = list(self.refusal_phrases)
        return out


def normalise_text(text: str) -> str:
    """Whitespace collapsed, case folded, curly apostrophes straightened: what comparisons use."""
    return " ".join(text.replace("\u2019", "'").split()).casefold()


def vote_key(text: str) -> str:
    """The answer as compared in votes: canonical JSON when it parses as JSON, else normalised text."""
    stripped = text.strip()
    if stripped[:1] in ("{", "[", '"') or stripped[:1].isdigit() or stripped in ("true", "false", "null"):
        try:
            return "json:" + json.dumps(json.loads(stripped), sort_keys=True, ensure_ascii=False,
                                        separators=(",", ":"))
        except ValueError:
            pass
    return "text:" + normalise_text(text)


def _token_counter(tokenizer: Any) -> Callable[[str], int]:
    if isinstance(tokenizer, str | Path):
        from slmops.data.tokens import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if hasattr(tokenizer, "convert_tokens_to_ids"):  # a Hugging Face tokenizer
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if callable(tokenizer):
        return lambda text: int(tokenizer(text))
    raise BadInputError(f"not a tokenizer: {tokenizer!r}")


class SampleChecker:
    """The per-sample checks of a FilterConfig: ``checker(text, finish_reason) -> reason | None``."""

    def __init__(self, config: FilterConfig):
        self.config = config
        self.regex = re.compile(config.regex) if config.regex else None
        self.validator = None
        if config.json_schema is not None:
            from jsonschema import Draft202012Validator, validators

            cls = validators.validator_for(config.json_schema, default=Draft202012Validator)
            self.validator = cls(config.json_schema)
        self.count_tokens = _token_counter(config.tokenizer) if config.tokenizer is not None else None
        self.phrases = [normalise_text(p) for p in config.refusal_phrases]

    def __call__(self, text: str, finish_reason: str | None = None) -> str | None:
        cfg = self.config
        if not text or not text.strip():
            return EMPTY
        if cfg.drop_truncated and finish_reason == "length":
            return TRUNCATED
        if cfg.json_valid:
            try:
                value = json.loads(text)
            except ValueError:
                return INVALID_JSON
            if self.validator is not None and not self.validator.is_valid(value):
                return SCHEMA_MISMATCH
        if self.regex is not None and not self.regex.search(text):
            return REGEX_MISMATCH
        n = len(text.strip())
        if cfg.min_chars is not None and n < cfg.min_chars:
            return TOO_SHORT
        if cfg.max_chars is not None and n > cfg.max_chars:
            return TOO_LONG
        if self.count_tokens is not None and (cfg.min_tokens is not None or cfg.max_tokens is not None):
            t = self.count_tokens(text)
            if cfg.min_tokens is not None and t < cfg.min_tokens:
                return TOO_SHORT
            if cfg.max_tokens is not None and t > cfg.max_tokens:
                return TOO_LONG
        if cfg.refusals:
            head = normalise_text(text[:REFUSAL_WINDOW])
            if any(p in head for p in self.phrases):
                return REFUSAL
        return None


# --- near duplicates ---------------------------------------------------------------------------------
def shingles(text: str, n: int = 5) -> set[str]:
    """Character n-grams of the normalised text (the whole text when it is shorter than n)."""
    t = normalise_text(text)
    if len(t) <= n:
        return {t}
    return {t[i:i + n] for i in range(len(t) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


_MINHASH_PERM = 128
_LSH_BANDS = 32  # 32 bands of 4 rows
_PRIME = 4294967311  # > 2**32: (a * x + b) mod p on uint64 never overflows for 32-bit x, a, b


def _minhash_params():
    import numpy as np

    rng = np.random.RandomState(20241)
    a = rng.randint(1, 2**32 - 1, size=_MINHASH_PERM, dtype=np.uint64)
    b = rng.randint(0, 2**32 - 1, size=_MINHASH_PERM, dtype=np.uint64)
    return a, b


def minhash(sh: set[str], params) -> Any:
    """A 128-value MinHash signature of a shingle set (crc32 shingle hashes, universal hashing)."""
    import numpy as np

    a, b = params
    x = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in sh), dtype=np.uint64, count=len(sh))
    return ((x[:, None] * a[None, :] + b[None, :]) % np.uint64(_PRIME)).min(axis=0)


def near_duplicates(texts: list[str], threshold: float, n: int = 5) -> dict[int, int]:
    """``{i: j}`` for every text i whose character n-gram Jaccard similarity to an earlier *kept* text j
    is at least `threshold` (greedy, in order: the first of a group is kept).

    Candidates come from MinHash LSH (128 permutations in 32 bands of 4 rows: a pair at Jaccard 0.6 is a
    candidate with probability 0.99, at 0.8 practically always), then each candidate's exact Jaccard
    similarity is computed, so there are no false positives; pairs below about 0.5 similarity are rarely
    even compared, which keeps the cost near linear.
    """
    params = _minhash_params()
    rows = _MINHASH_PERM // _LSH_BANDS
    buckets: dict[tuple[int, bytes], list[int]] = {}
    kept_shingles: dict[int, set[str]] = {}
    out: dict[int, int] = {}
    for i, text in enumerate(texts):
        sh = shingles(text, n)
        sig = minhash(sh, params)
        keys = [(band, sig[band * rows:(band + 1) * rows].tobytes()) for band in range(_LSH_BANDS)]
        candidates = sorted({j for key in keys for j in buckets.get(key, ())})
        match = next((j for j in candidates if jaccard(sh, kept_shingles[j]) >= threshold), None)
        if match is not None:
            out[i] = match
            continue
        kept_shingles[i] = sh
        for key in keys:
            buckets.setdefault(key, []).append(i)
    return out


# --- the pipeline ------------------------------------------------------------------------------------
@dataclass
class FilterOutcome:
    kept: list[dict] = field(default_factory=list)  # chat examples: {"messages", "metadata"}
    rejected: list[dict] = field(default_factory=list)  # {"messages", "reason", "samples", "metadata"}
    summary: dict[str, Any] = field(default_factory=dict)


def _prompt_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _group(rows: Iterable[dict]) -> list[list[dict]]:
    """Rows grouped by prompt (messages_hash), groups in prompt order, rows in first-seen teacher order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        key = row.get("messages_hash") or hashlib.sha256(
            json.dumps(row["messages"], sort_keys=True).encode()).hexdigest()
        groups.setdefault(key, []).append(row)
    return sorted(groups.values(), key=lambda g: min(r.get("index", 0) for r in g))


def filter_rows(rows: Iterable[dict], config: FilterConfig | None = None) -> FilterOutcome:
    """Check, vote and de-duplicate generation rows (see the module docstring)."""
    config = config or FilterConfig()
    check = SampleChecker(config)
    outcome = FilterOutcome()
    rejected_by: Counter[str] = Counter()
    sample_rejects: Counter[str] = Counter()
    n_samples = 0
    candidates: list[tuple[dict, dict]] = []  # (kept example, its group's rejected-form) before dedup
    for group in _group(rows):
        messages = group[0]["messages"]
        teachers = list(dict.fromkeys(r["teacher"] for r in group))
        samples = []
        for row in group:
            reasons = row.get("finish_reasons") or [None] * len(row["samples"])
            for k, text in enumerate(row["samples"]):
                reason = check(text, reasons[k] if k < len(reasons) else None)
                samples.append({"teacher": row["teacher"], "k": k, "text": text, "reason": reason})
        n_samples += len(samples)
        sample_rejects.update(s["reason"] for s in samples if s["reason"])
        meta = {"messages_hash": group[0].get("messages_hash"), "index": min(r.get("index", 0) for r in group),
                "teachers": teachers, "n_samples": len(samples),
                "prompt_hashes": {r["teacher"]: r.get("prompt_hash") for r in group}}
        valid = [s for s in samples if s["reason"] is None]
        if not valid:
            counts = Counter(s["reason"] for s in samples)
            reason = max(counts, key=lambda r: (counts[r], -SAMPLE_REASONS.index(r)))
            _reject(outcome, rejected_by, messages, reason, samples, {**meta, "agreement": 0.0})
            continue
        votes: dict[str, list[dict]] = {}
        for s in valid:
            votes.setdefault(vote_key(s["text"]), []).append(s)
        winner = max(votes.values(), key=lambda group_: len(group_))  # dicts keep order: ties -> earliest
        agreement = len(winner) / len(samples)
        agreeing = list(dict.fromkeys(s["teacher"] for s in winner))
        meta.update(agreement=round(agreement, 4), agreeing_teachers=agreeing,
                    teacher_votes={t: round(sum(1 for s in winner if s["teacher"] == t)
                                            / max(1, sum(1 for s in samples if s["teacher"] == t)), 4)
                                   for t in teachers})
        if config.min_agreement is not None and agreement < config.min_agreement:
            _reject(outcome, rejected_by, messages, LOW_AGREEMENT, samples, meta)
            continue
        answer = winner[0]["text"].strip()
        example = {"messages": [*messages, {"role": "assistant", "content": answer}], "metadata": meta}
        candidates.append((example, {"samples": samples}))

    seen: dict[str, int] = {}
    survivors: list[tuple[dict, dict]] = []
    for example, extra in candidates:
        if config.dedup:
            key = hashlib.sha256((normalise_text(_prompt_text(example["messages"][:-1])) + "\x00"
                                  + normalise_text(example["messages"][-1]["content"])).encode()).hexdigest()
            if key in seen:
                _reject(outcome, rejected_by, example["messages"][:-1], DUPLICATE, extra["samples"],
                        {**example["metadata"], "duplicate_of": seen[key]})
                continue
            seen[key] = example["metadata"]["index"]
        survivors.append((example, extra))
    if config.near_dup_threshold is not None and survivors:
        dups = near_duplicates([_prompt_text(e["messages"][:-1]) for e, _ in survivors],
                               config.near_dup_threshold, config.shingle_size)
        for i, j in dups.items():
            example, extra = survivors[i]
            _reject(outcome, rejected_by, example["messages"][:-1], NEAR_DUPLICATE, extra["samples"],
                    {**example["metadata"], "duplicate_of": survivors[j][0]["metadata"]["index"]})
        survivors = [s for i, s in enumerate(survivors) if i not in dups]
    outcome.kept = [e for e, _ in survivors]
    outcome.rejected.sort(key=lambda r: r["metadata"]["index"])
    total = len(outcome.kept) + len(outcome.rejected)
    agreements = [e["metadata"]["agreement"] for e in outcome.kept]
    all_teachers = list(dict.fromkeys(t for e in [*outcome.kept, *outcome.rejected] for t in e["metadata"]["teachers"]))
    outcome.summary = {
        "total": total,
        "kept": len(outcome.kept),
        "rejected": dict(sorted(rejected_by.items(), key=lambda kv: (-kv[1], kv[0]))),
        "samples": {"total": n_samples,
                    "rejected": dict(sorted(sample_rejects.items(), key=lambda kv: (-kv[1], kv[0])))},
        "agreement_mean": round(sum(agreements) / len(agreements), 4) if agreements else None,
        "teachers": all_teachers,
        "teacher_agreement": {
            t: round(sum(1 for e in outcome.kept if t in e["metadata"]["agreeing_teachers"])
                     / max(1, sum(1 for e in outcome.kept if t in e["metadata"]["teachers"])), 4)
            for t in all_teachers},
    }
    return outcome


def _reject(outcome: FilterOutcome, counter: Counter, messages: list[dict], reason: str, samples: list[dict],
            meta: dict) -> None:
    counter[reason] += 1
    outcome.rejected.append({"messages": messages, "reason": reason, "metadata": meta,
                             "samples": [{"teacher": s["teacher"], "text": s["text"], "reason": s["reason"]}
                                         for s in samples]})


def apply_filters(rows: Iterable[dict], config: FilterConfig | None = None) -> tuple[list[dict], dict]:
    """``(kept chat examples, summary)``; summary = ``{"total", "kept", "rejected": {reason: count}, ...}``."""
    outcome = filter_rows(rows, config)
    return outcome.kept, outcome.summary
