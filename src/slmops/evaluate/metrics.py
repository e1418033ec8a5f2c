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


# --- text-overlap metrics ----------------------------------------------------------------------------

_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    import string

    text = text.lower()
    text = "".join(ch if ch not in string.punctuation else " " for ch in text)
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style token F1 of the normalised answers (two empty answers score 1, one empty 0)."""
    from collections import Counter

    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) from the rouge-score package, no stemming."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(ref, pred)["rougeL"].fmeasure)


def bleu_stats(preds: list[str], refs: list[str]) -> list[list[int]]:
    """sacrebleu's per-sentence sufficient statistics (hyp length, ref length, 4 n-gram matches, 4 totals);
    summed over any subset of sentences they give that subset's corpus BLEU (:func:`bleu_from_stats`)."""
    from sacrebleu.metrics import BLEU

    if not preds:
        return []
    return [list(map(int, s)) for s in BLEU()._extract_corpus_statistics(preds, [refs])]


def bleu_from_stats(stats) -> float:
    """Corpus BLEU (0-100, sacrebleu's defaults: 13a tokenisation, exp smoothing) from summed statistics."""
    from sacrebleu.metrics import BLEU

    return float(BLEU()._compute_score_from_stats([int(x) for x in stats]).score)


def corpus_bleu(preds: list[str], refs: list[str]) -> float:
    """sacrebleu corpus BLEU (0-100) of `preds` against one reference each."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(preds, [refs]).score)


# --- classification and JSON schema --------------------------------------------------------------------


def answer_label(text: str, label_field: str | None = None) -> str | None:
    """The class label of an answer: the `label_field` value of a JSON object answer (None when missing),
    else the answer itself, trimmed, lower-cased and without surrounding punctuation."""
    if label_field:
        obj = parse_json_object(text)
        if obj is None or label_field not in obj:
            return None
        value = obj[label_field]
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return normalize(text).strip(" .!?;:,\"'`").lower()


def label_match(pred: str, ref: str, label_field: str | None = None) -> bool:
    """Whether the predicted class label equals the reference's (a missing label never matches)."""
    want = answer_label(ref, label_field)
    return want is not None and answer_label(pred, label_field) == want


def json_schema_valid(pred: str, schema: dict[str, Any]) -> tuple[bool, str | None]:
    """(valid, why not): the answer parses as JSON and validates against `schema` (jsonschema)."""
    import jsonschema

    try:
        value = json.loads(pred.strip())
    except (json.JSONDecodeError, ValueError) as exc:
        return False, f"not JSON: {exc.msg}" if hasattr(exc, "msg") else "not JSON"
    validator = jsonschema.validators.validator_for(schema)(schema)
    err = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if err is None:
        return True, None
    where = "/".join(str(p) for p in err.absolute_path) or "(root)"
    return False, f"{where}: {err.message}"
