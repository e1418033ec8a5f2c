"""Task metrics for generated answers: exact match, JSON validity and per-field accuracy."""

from __future__ import annotations

import json
from typing import Any


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(pred: str, ref: str) -> bool:
    """Equal after trimming and collapsing whitespace."""
    return normalize(pred) == normalize(ref)


def parse_json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def json_valid(pred: str) -> bool:
    """The answer parses as a JSON object."""
    return parse_json_object(pred) is not None


def field_accuracy(pred: str, ref: str) -> dict[str, bool]:
    """For a JSON reference answer: whether each of its fields is reproduced exactly by the prediction."""
    ref_obj = parse_json_object(ref)
    if ref_obj is None:
        return {}
    pred_obj = parse_json_object(pred) or {}
    return {k: (k in pred_obj and pred_obj[k] == v) for k, v in ref_obj.items()}


def score_answers(preds: list[str], refs: list[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Aggregate scores and per-example results for predictions against references."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    rows = []
    field_hits: dict[str, list[bool]] = {}
    for pred, ref in zip(preds, refs, strict=True):
        fields = field_accuracy(pred, ref)
        for k, ok in fields.items():
            field_hits.setdefault(k, []).append(ok)
        rows.append({"prediction": pred, "reference": ref, "exact_match": exact_match(pred, ref),
                     "json_valid": json_valid(pred), "fields": fields})
    n = max(1, len(rows))
    scores: dict[str, float] = {
        "exact_match": sum(r["exact_match"] for r in rows) / n,
        "json_valid": sum(r["json_valid"] for r in rows) / n,
    }
    for k, hits in field_hits.items():
        scores[f"field.{k}"] = sum(hits) / len(hits)
    if field_hits:
        scores["field_accuracy"] = sum(sum(h) for h in field_hits.values()) / sum(len(h) for h in field_hits.values())
    return scores, rows
