"""Parity of an export with its source model: size, perplexity, next-token KL, top-1 agreement, task metric.

Both models are :class:`slmops.engines.Engine` objects, so an ONNX export, a GGUF file and the Hugging
Face source are measured the same way::

    report = measure_parity(torch_engine, onnx_engine, texts=texts, records=records,
                            candidate_bytes=export_bytes, source_fp16_bytes=params * 2)
    check_gates(report, max_ppl_increase=0.05, min_task_retention=0.98)   # GateFailedError: exit 3
    print(parity_table(report))

What is measured, and how:

- **size**: `candidate_bytes` (default: the candidate engine's ``info().bytes_on_disk``) against the fp16
  size of the source, ``parameters * 2`` bytes (default: from the source engine's ``info().parameters``).
- **perplexity** of `texts` under each engine, from ``engine.logprobs(texts)``:
  ``exp(-(sum of token log-probs) / (number of scored tokens))`` over all texts together.
  ``ppl_ratio = ppl_candidate / ppl_source``.
- **mean KL and top-1 agreement** need whole next-token distributions. Engines that can give them have an
  optional method ``token_distributions(texts) -> list[numpy.ndarray]``: for a text of T tokens (tokenized
  as ``engine.tokenize`` does, no special tokens added) an array ``[T, V]`` of natural-log probabilities,
  row i being the distribution of the token after tokens ``0..i``. ``mean_kl`` is KL(source || candidate)
  averaged over every row of every text; ``top1_agreement`` the share of rows whose argmax agrees. Texts
  that the two engines tokenize differently are left out (noted); when the vocabularies differ in width
  the shared first ids are compared, each side renormalised over them. Either engine without the method:
  both stay None.
- **task metric**: greedy answers to `records` (chat records ending with the reference answer) through
  :func:`slmops.evaluate.runner.evaluate_engine`; ``exact_match_retention = candidate / source``.

Anything not measurable is None.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from slmops.errors import BadInputError, GateFailedError


@dataclass
class ParityReport:
    size_bytes: int | None = None
    source_fp16_bytes: int | None = None
    size_ratio_vs_fp16: float | None = None
    ppl_source: float | None = None
    ppl_candidate: float | None = None
    ppl_ratio: float | None = None
    mean_kl: float | None = None
    top1_agreement: float | None = None
    exact_match_source: float | None = None
    exact_match_candidate: float | None = None
    exact_match_retention: float | None = None
    n_texts: int = 0
    n_records: int = 0
    n_kl_tokens: int = 0  # next-token distributions compared for mean_kl / top1_agreement
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParityReport:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def perplexity(engine, texts: list[str]) -> float | None:
    """Token-weighted perplexity of `texts` under `engine` (None when the engine gives no logprobs)."""
    lps = engine.logprobs(texts)
    if lps is None:
        return None
    total = sum(lp.total for lp in lps)
    n = sum(lp.scored_tokens for lp in lps)
    if n == 0:
        return None
    return math.exp(-total / n)


def _log_normalise(x):
    import numpy as np

    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def compare_distributions(source, candidate, texts: list[str]) -> tuple[float | None, float | None, int, list[str]]:
    """(mean KL(source || candidate), top-1 agreement, rows compared, notes) over `texts`, one text at a
    time (a [T, V] array per engine stays in memory, never all texts at once)."""
    import numpy as np

    notes: list[str] = []
    missing = [e.name for e in (source, candidate) if not callable(getattr(e, "token_distributions", None))]
    if missing:
        return None, None, 0, [f"KL and top-1 agreement not measured: the {', '.join(missing)} engine gives no "
                               "next-token distributions"]
    kl_sum = 0.0
    agree = 0
    rows = 0
    skipped = 0
    width_note = False
    for text in texts:
        if source.tokenize(text) != candidate.tokenize(text):
            skipped += 1
            continue
        ds = source.token_distributions([text])[0]
        dc = candidate.token_distributions([text])[0]
        if ds is None or dc is None or ds.shape[0] != dc.shape[0] or ds.shape[0] == 0:
            skipped += 1
            continue
        ds = np.asarray(ds, dtype=np.float64)
        dc = np.asarray(dc, dtype=np.float64)
        if ds.shape[1] != dc.shape[1]:
            v = min(ds.shape[1], dc.shape[1])
            ds, dc = _log_normalise(ds[:, :v]), _log_normalise(dc[:, :v])
            width_note = True
        ps = np.exp(ds)
        kl = (ps * (ds - dc)).sum(axis=-1)
        kl_sum += float(np.clip(kl, 0.0, None).sum())
        agree += int((ds.argmax(-1) == dc.argmax(-1)).sum())
        rows += ds.shape[0]
    if skipped:
        notes.append(f"{skipped} of {len(texts)} texts left out of KL/top-1: the engines tokenize them differently")
    if width_note:
        notes.append("vocabulary widths differ: KL/top-1 compare the shared first token ids")
    if rows == 0:
        return None, None, 0, notes
    return kl_sum / rows, agree / rows, rows, notes


def measure_parity(
    source,
    candidate,
    *,
    texts: list[str] | None = None,
    records: list[dict] | None = None,
    candidate_bytes: int | None = None,
    source_fp16_bytes: int | None = None,
    max_new_tokens: int = 96,
) -> ParityReport:
    """Measure how closely the `candidate` engine (an export) follows the `source` engine (see the module
    docstring for every metric). `texts` give perplexity, KL and top-1 agreement; `records` the task metric
    (exact match); without either only the size is reported."""
    report = ParityReport(n_texts=len(texts or []), n_records=len(records or []))
    if candidate_bytes is None:
        try:
            candidate_bytes = candidate.info().bytes_on_disk
        except Exception:  # noqa: BLE001 - an engine that cannot say: size unknown
            candidate_bytes = None
    if source_fp16_bytes is None:
        try:
            params = source.info().parameters
        except Exception:  # noqa: BLE001
            params = None
        source_fp16_bytes = params * 2 if params else None
    report.size_bytes = candidate_bytes
    report.source_fp16_bytes = source_fp16_bytes
    if candidate_bytes and source_fp16_bytes:
        report.size_ratio_vs_fp16 = candidate_bytes / source_fp16_bytes

    if texts:
        report.ppl_source = perplexity(source, texts)
        report.ppl_candidate = perplexity(candidate, texts)
        if report.ppl_source and report.ppl_candidate is not None:
            report.ppl_ratio = report.ppl_candidate / report.ppl_source
        for name, value in (("source", report.ppl_source), ("candidate", report.ppl_candidate)):
            if value is None:
                report.notes.append(f"perplexity not measured: the {name} engine gives no logprobs")
        kl, top1, n, notes = compare_distributions(source, candidate, texts)
        report.mean_kl, report.top1_agreement, report.n_kl_tokens = kl, top1, n
        report.notes += notes

    if records:
        from slmops.evaluate.runner import evaluate_engine

        src = evaluate_engine(source, records, max_new_tokens=max_new_tokens)
        cand = evaluate_engine(candidate, records, max_new_tokens=max_new_tokens)
        report.exact_match_source = src.scores["exact_match"]
        report.exact_match_candidate = cand.scores["exact_match"]
        if report.exact_match_source > 0:
            report.exact_match_retention = report.exact_match_candidate / report.exact_match_source
        else:
            report.notes.append("exact-match retention not defined: the source model scores 0")
    return report


def texts_from_records(records: list[dict], engine=None, chat_template: str | None = None) -> list[str]:
    """Whole conversations of chat `records`, rendered as text for perplexity: with the chat template of
    `engine` (its tokenizer's, for the torch engine) or `chat_template`; records joined plainly (one message
    per line) when neither has a template."""
    tok = getattr(engine, "tokenizer", None)
    if tok is not None and getattr(tok, "chat_template", None):
        return [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
    if chat_template is None and engine is not None:
        chat_template = engine.info().chat_template
    if chat_template:
        from slmops.models.templates import render_chat_template

        return [render_chat_template(chat_template, r["messages"]) for r in records]
    return ["\n".join(m["content"] for m in r["messages"]) for r in records]


def check_gates(report: ParityReport, *, max_ppl_increase: float | None = None,
                min_task_retention: float | None = None) -> None:
    """Raise :class:`GateFailedError` (exit code 3) naming every gate that failed.

    `max_ppl_increase`: the largest allowed relative perplexity increase (0.05: the candidate's perplexity
    may be at most 5% above the source's). `min_task_retention`: the smallest allowed share of the
    source's exact match kept by the candidate (0.98: at least 98%). A gate whose metric was not measured
    is a ``BadInputError`` (the evaluation data that gate needs was not given).
    """
    failed: list[str] = []
    if max_ppl_increase is not None:
        if max_ppl_increase < 0:
            raise BadInputError(f"max_ppl_increase must be >= 0, got {max_ppl_increase}")
        if report.ppl_ratio is None:
            raise BadInputError("the perplexity gate needs perplexity on evaluation texts, and none was measured",
                                "pass evaluation data (--eval-file) with the gate")
        increase = report.ppl_ratio - 1.0
        if increase > max_ppl_increase:
            failed.append(f"perplexity rose {increase:+.2%} ({report.ppl_source:.4g} -> {report.ppl_candidate:.4g}), "
                          f"more than the allowed {max_ppl_increase:.2%}")
    if min_task_retention is not None:
        if not 0 <= min_task_retention:
            raise BadInputError(f"min_task_retention must be >= 0, got {min_task_retention}")
        if report.exact_match_retention is None:
            raise BadInputError("the task-retention gate needs exact match on evaluation records, and none was "
                                "measured" + (" (the source scores 0)" if report.exact_match_source == 0 else ""),
                                "pass evaluation records with answers (--eval-file) with the gate")
        if report.exact_match_retention < min_task_retention:
            failed.append(f"exact match kept {report.exact_match_retention:.1%} of the source's "
                          f"({report.exact_match_source:.1%} -> {report.exact_match_candidate:.1%}), "
                          f"below the required {min_task_retention:.1%}")
    if failed:
        err = GateFailedError("quality gate failed: " + "; ".join(failed),
                              "use a higher precision (int8/fp32, q8_0), or relax the gate")
        err.report = report  # type: ignore[attr-defined]
        raise err


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        v = float(value)
        for unit in ("B", "KB", "MB", "GB"):
            if v < 1024 or unit == "GB":
                return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
            v /= 1024
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "ratio":
        return f"{value:.3f}"
    return f"{value:.4g}"


def parity_table(report: ParityReport) -> str:
    """The report as a markdown table: metric | source | export | change."""
    rows = [("metric", "source", "export", "change"), ("---", "---:", "---:", "---:")]
    ratio = report.size_ratio_vs_fp16
    rows.append(("size on disk (source: fp16)", _fmt(report.source_fp16_bytes, "bytes"), _fmt(report.size_bytes, "bytes"),
                 "-" if ratio is None else f"{ratio:.3f}x ({1 - ratio:.0%} smaller)" if ratio <= 1 else f"{ratio:.3f}x (larger)"))
    if report.n_texts:
        rows.append((f"perplexity ({report.n_texts} texts)", _fmt(report.ppl_source, "num"),
                     _fmt(report.ppl_candidate, "num"),
                     f"{report.ppl_ratio - 1:+.2%}" if report.ppl_ratio is not None else "-"))
        rows.append((f"mean KL, next token ({report.n_kl_tokens} positions)", "", _fmt(report.mean_kl, "num"), ""))
        rows.append(("top-1 agreement", "", _fmt(report.top1_agreement, "pct"), ""))
    if report.n_records:
        rows.append((f"exact match ({report.n_records} records)", _fmt(report.exact_match_source, "pct"),
                     _fmt(report.exact_match_candidate, "pct"),
                     f"retention {_fmt(report.exact_match_retention, 'pct')}"))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    for note in report.notes:
        lines.append(f"\nnote: {note}")
    return "\n".join(lines)


__all__ = ["ParityReport", "check_gates", "compare_distributions", "measure_parity", "parity_table", "perplexity",
           "texts_from_records"]
