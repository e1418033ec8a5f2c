"""Statistics of a validated dataset: counts, roles and turns, duplicates, length percentiles."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slmops.data.dataset import ChatDataset, load_dataset_file
from slmops.data.formats import ROLES
from slmops.data.tokens import count_tokens, load_tokenizer, render_text


def percentiles(values: Sequence[int]) -> dict[str, int] | None:
    """Nearest-rank p50 / p90 / p99 and max of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(p: float) -> int:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


def _duplicates(items: list[Any]) -> int:
    """How many items repeat an earlier one exactly."""
    keys = [json.dumps(item, sort_keys=True, ensure_ascii=False) for item in items]
    return len(keys) - len(set(keys))


def _lengths(prompts: list[list[dict]], completions: list[str], tokenizer: Any | None) -> dict[str, Any]:
    chars = {
        "prompt": percentiles([sum(len(m["content"]) for m in p) for p in prompts]),
        "completion": percentiles([len(c) for c in completions]),
    }
    if tokenizer is None:
        return {"chars": chars, "tokens": None}
    tok = load_tokenizer(tokenizer)
    tokens = {
        "prompt": percentiles(count_tokens(tok, [render_text(tok, p) for p in prompts])),
        "completion": percentiles(count_tokens(tok, completions)),
    }
    return {"chars": chars, "tokens": tokens}


def inspect_dataset(ds: ChatDataset, tokenizer: str | Path | Any | None = None) -> dict[str, Any]:
    """Statistics of `ds` as a JSON-ready dict.

    Keys: ``path``, ``format``, ``purpose``, ``records``, ``with_completion``, ``messages_per_role``
    (system/user/assistant message counts), ``turns`` (user turns per record: min/mean/max and how many
    records are multi-turn), ``duplicates`` (``prompts``: records whose prompt messages repeat an earlier
    record's exactly; ``records``: records whose whole conversation does), ``chars`` and ``tokens``
    (p50/p90/p99/max of the prompt's characters, all prompt messages together, and of the answer's;
    ``tokens`` counts the prompt rendered with the tokenizer's chat template, and is None without a
    tokenizer).
    """
    messages = ds.messages
    prompts = ds.prompts()
    completions = [c for c in ds.completions() if c is not None]
    roles = Counter(m["role"] for msgs in messages for m in msgs)
    user_turns = [sum(m["role"] == "user" for m in msgs) for msgs in messages]
    return {
        "path": str(ds.path),
        "format": ds.format,
        "purpose": ds.purpose,
        "records": len(ds),
        "with_completion": len(completions),
        "messages_per_role": {role: roles.get(role, 0) for role in ROLES},
        "turns": {
            "min": min(user_turns),
            "mean": round(sum(user_turns) / len(user_turns), 2),
            "max": max(user_turns),
            "multi_turn": sum(n > 1 for n in user_turns),
        },
        "duplicates": {"prompts": _duplicates(prompts), "records": _duplicates(messages)},
        **_lengths(prompts, completions, tokenizer),
    }


def inspect_file(
    path: str | Path,
    fmt: str | None = None,
    template: str | None = None,
    completion_field: str | None = None,
    *,
    purpose: str = "auto",
    split: str = "train",
    tokenizer: str | Path | Any | None = None,
) -> dict[str, Any]:
    """Validate `path` (BadInputError if it is bad) and return :func:`inspect_dataset` of it."""
    ds = load_dataset_file(path, fmt, template, completion_field, purpose=purpose, split=split)
    return inspect_dataset(ds, tokenizer)
