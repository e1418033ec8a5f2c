"""`slmops eval` as a Python API: task metrics with bootstrap intervals, perplexity, agreement with a
reference model, behaviour checks and quality gates, for any number of models, measured the same way.

    from slmops.evaluate.suite import run_evaluation
    from slmops.evaluate.gates import parse_gate

    run = run_evaluation(["demo-teacher", "exports/teacher-int4"], "data/test.jsonl",
                         gates=[parse_gate("exact_match>=0.9")], out="eval-out", workspace=ws)
    run.raise_for_gates()          # GateFailedError (exit 3), one line per failed gate

Every model is opened with :func:`slmops.engines.open_engine` and answers greedily, in batches, to the chat
messages of every record; each engine renders them with the model's own chat template (``engine.render``;
a server applies its own), or, for a model without one, sends the user text as a raw prompt. Which of these
each model used is recorded as its ``template``.

Metrics (``--metrics``; per-example values are saved, every metric gets a bootstrap interval, see
:mod:`slmops.evaluate.bootstrap`):

``exact_match``    answer == reference after trimming and collapsing whitespace
``json_valid``     the answer parses as a JSON object (with a schema: as JSON valid under the schema)
``field_accuracy`` share of the reference JSON's fields reproduced exactly (micro-average), plus
                   ``field.<name>`` per field
``token_f1``       SQuAD-style token F1 (lower case, no punctuation or articles)
``rouge_l``        ROUGE-L F-measure (rouge-score)
``bleu``           sacrebleu corpus BLEU, 0-100
``accuracy``       class label match: the ``label_field`` of JSON answers, else the whole answer
``perplexity``     exp(mean negative log-likelihood) of the reference answer tokens given the rendered prompt
                   (records without answers, or a .txt file: of the whole text); needs engine logprobs
``agreement``      with a reference model: ``output_match`` (same answer), and where both engines give
                   next-token distributions ``top1_agreement`` and ``mean_kl`` (KL(reference || model)) over the
                   reference's rendered prompt + answer (:func:`slmops.export.parity.compare_distributions`)
``checks``         behaviour checks on edge-case inputs and length consistency (:mod:`slmops.evaluate.checks`)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.engines.base import Engine, GenerationRequest, GenerationResult
from slmops.errors import BadInputError, SlmopsError
from slmops.evaluate import metrics as M
from slmops.evaluate.bootstrap import MetricSamples, Score, bootstrap, exp_ratio
from slmops.evaluate.gates import Gate, GateResult, check_gates, failure_lines, raise_if_failed

METRICS = ("exact_match", "json_valid", "field_accuracy", "token_f1", "rouge_l", "bleu", "accuracy", "perplexity",
           "agreement", "checks")
NEEDS_REFERENCE_ANSWERS = ("exact_match", "field_accuracy", "token_f1", "rouge_l", "bleu", "accuracy")
# score names each metric produces (besides field.<name> / check.<name>)
PRODUCES = {"agreement": ("output_match", "top1_agreement", "mean_kl")}
ProgressFactory = Callable[[str, int | None], AbstractContextManager[Callable[..., None]]]


# --- data ----------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """What is evaluated: chat prompts with (optional) reference answers, or plain texts (perplexity only)."""

    path: Path
    prompts: list[list[dict[str, str]]] = field(default_factory=list)
    references: list[str | None] = field(default_factory=list)
    texts: list[str] | None = None  # a .txt file: one text per non-empty line
    sources: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    label: str | None = None  # the name results are recorded under (default: the file's stem)

    @property
    def name(self) -> str:
        return self.label or self.path.stem

    @property
    def n(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.prompts)

    @property
    def has_answers(self) -> bool:
        return bool(self.references) and all(r is not None for r in self.references)

    @property
    def json_task(self) -> bool:
        """Most reference answers are JSON objects."""
        refs = [r for r in self.references if r is not None]
        return bool(refs) and sum(M.json_valid(r) for r in refs) * 2 > len(refs)


def load_eval_data(path: str | Path, *, limit: int | None = None) -> EvalData:
    """Any data file slmops reads (chat, prompt-completion, input-output, prompts...), or a .txt file of texts."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"data file not found: {path}", "pass --data FILE (e.g. `slmops demo data` writes one)")
    if path.suffix.lower() == ".txt":
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if limit:
            texts = texts[:limit]
        if not texts:
            raise BadInputError(f"{path} has no text")
        return EvalData(path, texts=texts, sources=[f"{path}:{i + 1}" for i in range(len(texts))])
    from slmops.data import load_dataset_file
    from slmops.data.formats import completion_part, prompt_part

    records = load_dataset_file(path, purpose="prompts").records
    if limit:
        records = records[:limit]
    if not records:
        raise BadInputError(f"{path} has no records")
    prompts = [prompt_part(r["messages"]) for r in records]
    refs = [completion_part(r["messages"]) for r in records]
    return EvalData(path, prompts=prompts, references=refs, sources=[r.get("source", "") for r in records],
                    records=records)


def default_metrics(data: EvalData) -> list[str]:
    """exact_match + json_valid + field_accuracy for JSON answers, exact_match + token_f1 for text answers,
    perplexity for a file of texts, checks for prompts without answers."""
    if data.texts is not None:
        return ["perplexity"]
    if not data.has_answers:
        return ["checks"]
    return ["exact_match", "json_valid", "field_accuracy"] if data.json_task else ["exact_match", "token_f1"]


def resolve_metrics(requested: list[str] | None, data: EvalData, *, reference: bool = False) -> list[str]:
    """Validate metric names (comma lists allowed) against the data; None gives :func:`default_metrics`."""
    if not requested:
        out = default_metrics(data)
        return [*out, "agreement"] if reference and data.texts is None else out
    names: list[str] = []
    for item in requested:
        for name in (s.strip() for s in item.split(",")):
            if not name:
                continue
            if name not in METRICS:
                raise BadInputError(f"unknown metric {name!r}", f"choose from: {', '.join(METRICS)}")
            if name not in names:
                names.append(name)
    if data.texts is not None and set(names) - {"perplexity"}:
        raise BadInputError(f"{data.path} is plain text: only perplexity can be measured on it",
                            "use --metrics perplexity, or a chat/prompt-completion file for task metrics")
    if not data.has_answers:
        missing = [n for n in names if n in NEEDS_REFERENCE_ANSWERS]
        if missing:
            raise BadInputError(f"{', '.join(missing)} need reference answers, and {data.path} has records without one",
                                "use a file whose records end with the answer (chat with an assistant turn, "
                                "prompt-completion), or only --metrics json_valid,perplexity,agreement,checks")
    if "agreement" in names and not reference:
        raise BadInputError("the agreement metric needs a reference model", "pass --reference MODEL")
    return names


# --- results ---------------------------------------------------------------------------------------------


@dataclass
class ModelEval:
    """One model's evaluation: scores with intervals, per-example rows, gate results."""

    model: str
    name: str
    engine: str
    format: str
    precision: str
    template: str
    scores: dict[str, Score] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)
    n: int = 0
    wall_s: float = 0.0
    answers_per_s: float = 0.0
    artifact_id: str | None = None
    role: str = "candidate"  # or "baseline"
    template_preview: str | None = None
    answers: list[GenerationResult | None] = field(default_factory=list, repr=False)

    def values(self) -> dict[str, float | None]:
        return {k: s.value for k, s in self.scores.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "name": self.name, "engine": self.engine, "format": self.format,
                "precision": self.precision, "template": self.template, "template_preview": self.template_preview,
                "role": self.role, "artifact": self.artifact_id, "n": self.n, "wall_s": self.wall_s,
                "answers_per_s": self.answers_per_s,
                "scores": {k: s.to_dict() for k, s in self.scores.items()},
                "gates": [g.to_dict() for g in self.gates], "notes": self.notes}


@dataclass
class EvalRun:
    """Everything one `slmops eval` measured."""

    data: str
    data_name: str
    metrics: list[str]
    models: list[ModelEval]
    baseline: ModelEval | None = None
    reference: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def gate_results(self) -> list[GateResult]:
        return [g for m in self.models for g in m.gates]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gate_results)

    def failures(self) -> list[str]:
        return failure_lines(self.gate_results)

    def raise_for_gates(self) -> None:
        """GateFailedError (exit code 3), one line per failed gate, when any gate failed."""
        raise_if_failed(self.gate_results)

    def score_names(self) -> list[str]:
        names: list[str] = []
        for m in self.all_models():
            names += [k for k in m.scores if k not in names]
        return names

    def all_models(self) -> list[ModelEval]:
        return self.models + ([self.baseline] if self.baseline is not None else [])

    def to_dict(self) -> dict[str, Any]:
        """The eval.json contract: data, metrics, models (with scores and gates), machine."""
        return {"data": self.data, "data_name": self.data_name, "metrics": self.score_names(),
                "models": [m.to_dict() for m in self.all_models()], "reference": self.reference,
                "gates_passed": self.passed, "settings": self.settings, "machine": self.machine}

    def markdown(self) -> str:
        return eval_markdown(self)


# --- generation ----------------------------------------------------------------------------------------


def raw_prompt(messages: list[dict[str, str]]) -> str:
    """A prompt for a model without a chat template: the user text, or "role: content" lines."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def template_label(engine: Engine, sample: list[dict[str, str]] | None) -> tuple[str, str | None, bool]:
    """(how prompts are rendered, a preview of the first rendered prompt, whether to send raw prompts)."""
    info = engine.info()
    if info.format == "remote":
        model = info.extra.get("model") if info.extra else None
        return f"server chat template ({model or 'default model'} at {info.path})", None, False
    template = info.chat_template
    if not template:
        return "raw prompt (no chat template)", raw_prompt(sample)[:300] if sample else None, True
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]
    first = template.strip().splitlines()[0][:60] if template.strip() else ""
    preview = None
    if sample:
        try:
            preview = engine.render(GenerationRequest(messages=sample))[:300]
        except SlmopsError:
            return "raw prompt (the chat template does not render)", raw_prompt(sample)[:300], True
    return f"chat template sha256:{digest} ({first})", preview, False


def settled(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationResult | Exception]:
    """Results of a batch; when the batch fails, each request alone (its error in its place)."""
    try:
        return list(engine.generate(requests))
    except Exception:  # noqa: BLE001 - find the request(s) that fail, keep the others' answers
        pass
    out: list[GenerationResult | Exception] = []
    for req in requests:
        try:
            out.append(engine.generate([req])[0])
        except Exception as exc:  # noqa: BLE001 - recorded as that check's failure
            out.append(exc)
    return out


def generate_answers(engine: Engine, prompts: list[list[dict[str, str]]], *, max_new_tokens: int, batch_size: int,
                     raw: bool = False, advance: Callable[..., None] | None = None) -> list[GenerationResult]:
    """Greedy answers to every prompt, `batch_size` at a time through ``engine.generate``."""
    out: list[GenerationResult] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        reqs = [GenerationRequest(prompt=raw_prompt(m), max_new_tokens=max_new_tokens) if raw
                else GenerationRequest(messages=m, max_new_tokens=max_new_tokens) for m in chunk]
        out += engine.generate(reqs)
        if advance:
            advance(len(chunk))
    return out


# --- perplexity --------------------------------------------------------------------------------------------


def perplexity_stats(engine: Engine, data: EvalData, *, raw: bool = False, batch_size: int = 8,
                     advance: Callable[..., None] | None = None) -> tuple[list[tuple[float, int]] | None, str]:
    """Per example (negative log-likelihood sum, tokens scored) and what was scored; None without logprobs."""
    if data.texts is not None:
        texts, prefixes, what = data.texts, None, "whole texts"
    elif data.has_answers:
        try:
            prefixes = [raw_prompt(p) if raw else engine.render(GenerationRequest(messages=p)) for p in data.prompts]
        except SlmopsError:  # a server renders its prompts itself (and gives no logprobs either)
            return None, "reference answer tokens given the rendered prompt"
        texts = [pre + (ref or "") for pre, ref in zip(prefixes, data.references, strict=True)]
        what = "reference answer tokens given the rendered prompt"
    else:
        from slmops.export.parity import texts_from_records

        if engine.info().format == "remote":
            return None, "whole rendered conversations"
        texts = ([raw_prompt(p) for p in data.prompts] if raw else texts_from_records(data.records, engine))
        prefixes, what = None, "whole rendered conversations"
    out: list[tuple[float, int]] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        lps = engine.logprobs(chunk)
        if lps is None:
            return None, what
        for j, lp in enumerate(lps):
            skip = 1
            if prefixes is not None:
                pre_ids = engine.tokenize(prefixes[start + j])
                k = 0
                while k < min(len(pre_ids), len(lp.token_ids)) and pre_ids[k] == lp.token_ids[k]:
                    k += 1
                skip = max(1, k)
            vals = [v for v in lp.logprobs[skip:] if v is not None]
            out.append((-float(sum(vals)), len(vals)))
        if advance:
            advance(len(chunk))
    return out, what


# --- one model ---------------------------------------------------------------------------------------------


@dataclass
class ReferenceRun:
    """The reference model of `--reference`: its engine and its answers to the data's prompts."""

    ref: str
    engine: Engine
    answers: list[GenerationResult]
    raw: bool = False


def _score_examples(data: EvalData, preds: list[str], metrics: list[str], *, json_schema: dict | None,
                    label_field: str | None) -> tuple[list[dict[str, Any]], list[MetricSamples]]:
    rows: list[dict[str, Any]] = []
    samples: list[MetricSamples] = []
    refs = data.references
    for i, pred in enumerate(preds):
        rows.append({"index": i, "source": data.sources[i] if i < len(data.sources) else "",
                     "prompt": data.prompts[i][-1]["content"] if data.prompts[i] else "",
                     "reference": refs[i], "prediction": pred})
    if "exact_match" in metrics:
        vals = [M.exact_match(p, r or "") for p, r in zip(preds, refs, strict=True)]
        for row, v in zip(rows, vals, strict=True):
            row["exact_match"] = v
        samples.append(MetricSamples.mean("exact_match", vals))
    if "json_valid" in metrics:
        vals = []
        for row, p in zip(rows, preds, strict=True):
            if json_schema is not None:
                ok, why = M.json_schema_valid(p, json_schema)
                if why:
                    row["json_error"] = why
            else:
                ok = M.json_valid(p)
            row["json_valid"] = ok
            vals.append(ok)
        samples.append(MetricSamples.mean("json_valid", vals))
    if "field_accuracy" in metrics:
        fields = [M.field_accuracy(p, r or "") for p, r in zip(preds, refs, strict=True)]
        for row, f in zip(rows, fields, strict=True):
            row["fields"] = f
        samples.append(MetricSamples.ratio_of_sums("field_accuracy", [sum(f.values()) for f in fields],
                                                   [len(f) for f in fields]))
        names: list[str] = []
        for f in fields:
            names += [k for k in f if k not in names]
        for k in names:
            samples.append(MetricSamples.ratio_of_sums(f"field.{k}", [float(f.get(k, False)) for f in fields],
                                                       [1.0 if k in f else 0.0 for f in fields]))
    if "token_f1" in metrics:
        vals = [M.token_f1(p, r or "") for p, r in zip(preds, refs, strict=True)]
        for row, v in zip(rows, vals, strict=True):
            row["token_f1"] = v
        samples.append(MetricSamples.mean("token_f1", vals))
    if "rouge_l" in metrics:
        vals = [M.rouge_l(p, r or "") for p, r in zip(preds, refs, strict=True)]
        for row, v in zip(rows, vals, strict=True):
            row["rouge_l"] = v
        samples.append(MetricSamples.mean("rouge_l", vals))
    if "bleu" in metrics:
        import numpy as np

        stats = M.bleu_stats(preds, [r or "" for r in refs])
        samples.append(MetricSamples("bleu", np.asarray(stats, dtype=np.float64).reshape(len(preds), -1),
                                     M.bleu_from_stats))
    if "accuracy" in metrics:
        vals = []
        for row, p, r in zip(rows, preds, refs, strict=True):
            row["label"], row["reference_label"] = M.answer_label(p, label_field), M.answer_label(r or "", label_field)
            ok = M.label_match(p, r or "", label_field)
            row["accuracy"] = ok
            vals.append(ok)
        samples.append(MetricSamples.mean("accuracy", vals))
    return rows, samples


def evaluate_model(
    engine: Engine,
    data: EvalData,
    metrics: list[str],
    *,
    model: str = "",
    name: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    json_schema: dict | None = None,
    label_field: str | None = None,
    reference: ReferenceRun | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: ProgressFactory | None = None,
) -> ModelEval:
    """Evaluate one open engine on `data` (see the module docstring for `metrics`)."""
    info = engine.info()
    sample = data.prompts[0] if data.prompts else None
    template, preview, raw = template_label(engine, sample)
    res = ModelEval(model=model or info.path, name=name or Path(str(info.path)).name, engine=info.name,
                    format=info.format, precision=info.precision, template=template, template_preview=preview,
                    n=data.n)
    bar = progress or (lambda desc, total: nullcontext(lambda n=1, **kw: None))
    samples: list[MetricSamples] = []
    t0 = time.perf_counter()
    need_answers = data.texts is None and any(m != "perplexity" for m in metrics)
    preds: list[str] = []
    if need_answers:
        with bar(f"answers {res.name}", data.n) as advance:
            answers = generate_answers(engine, data.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       raw=raw, advance=advance)
        res.answers = list(answers)
        preds = [a.text for a in answers]
        gen_s = time.perf_counter() - t0
        res.answers_per_s = len(preds) / gen_s if gen_s > 0 else 0.0
        rows, more = _score_examples(data, preds, metrics, json_schema=json_schema, label_field=label_field)
        for row, a in zip(rows, answers, strict=True):
            row.update(finish_reason=a.finish_reason, prompt_tokens=a.prompt_tokens,
                       completion_tokens=a.completion_tokens)
        res.examples = rows
        samples += more
    else:
        res.examples = [{"index": i, "source": data.sources[i] if i < len(data.sources) else ""} for i in range(data.n)]

    if "perplexity" in metrics:
        with bar(f"perplexity {res.name}", data.n) as advance:
            stats, what = perplexity_stats(engine, data, raw=raw, advance=advance)
        if stats is None:
            res.notes.append(f"perplexity not measured: the {info.name} engine gives no logprobs")
            samples.append(MetricSamples.ratio_of_sums("perplexity", [], [], exp_ratio))
        else:
            res.notes.append(f"perplexity of the {what}")
            for row, (nll, n) in zip(res.examples, stats, strict=True):
                row["perplexity"] = math.exp(nll / n) if n else None
                row["perplexity_tokens"] = n
            samples.append(MetricSamples.ratio_of_sums("perplexity", [s[0] for s in stats], [s[1] for s in stats],
                                                       exp_ratio))

    if "agreement" in metrics and reference is not None:
        samples += _agreement(engine, reference, data, preds, res)

    if "checks" in metrics:
        samples += _checks(engine, data, res, raw=raw, max_new_tokens=max_new_tokens, seed=seed, bar=bar)

    res.wall_s = time.perf_counter() - t0
    for s in samples:
        res.scores[s.name] = bootstrap(s, resamples=resamples, confidence=confidence, seed=seed)
    return res


def _agreement(engine: Engine, reference: ReferenceRun, data: EvalData, preds: list[str],
               res: ModelEval) -> list[MetricSamples]:
    from slmops.export.parity import compare_distributions

    ref_preds = [a.text for a in reference.answers]
    match = [M.exact_match(p, r) for p, r in zip(preds, ref_preds, strict=True)]
    for row, r, ok in zip(res.examples, ref_preds, match, strict=True):
        row["reference_model_answer"], row["output_match"] = r, ok
    out = [MetricSamples.mean("output_match", match)]
    kl_sum, agree, rows = [], [], []
    notes: set[str] = set()
    try:
        texts = [(raw_prompt(p) if reference.raw else reference.engine.render(GenerationRequest(messages=p))) + r
                 for p, r in zip(data.prompts, ref_preds, strict=True)]
    except SlmopsError as exc:
        texts = []
        notes.add(f"top-1 agreement and KL not measured: the reference cannot render prompts ({exc.message})")
    for row, text in zip(res.examples, texts, strict=False):
        kl, top1, n, more = compare_distributions(reference.engine, engine, [text])
        notes.update(note for note in more if "engine gives no" in note)
        if n:
            row["top1_agreement"], row["mean_kl"] = top1, kl
        kl_sum.append((kl or 0.0) * n)
        agree.append((top1 or 0.0) * n)
        rows.append(n)
    skipped = sum(1 for n in rows if n == 0)
    if skipped and not notes:
        notes.add(f"{skipped} of {len(rows)} texts left out of top-1/KL (tokenized differently by the two models)")
    res.notes += sorted(notes)
    if texts and sum(rows):
        out.append(MetricSamples.ratio_of_sums("top1_agreement", agree, rows))
        out.append(MetricSamples.ratio_of_sums("mean_kl", kl_sum, rows))
    else:
        out.append(MetricSamples.ratio_of_sums("top1_agreement", [], []))
        out.append(MetricSamples.ratio_of_sums("mean_kl", [], []))
    return out


def _checks(engine: Engine, data: EvalData, res: ModelEval, *, raw: bool, max_new_tokens: int, seed: int,
            bar: ProgressFactory) -> list[MetricSamples]:
    from slmops.evaluate.checks import run_checks

    info = engine.info()
    fits = None
    if info.format != "remote" and info.context_length:
        budget = info.context_length - max_new_tokens - 8
        system = [m for m in (data.prompts[0] if data.prompts else []) if m["role"] == "system"][:1]

        def fits(text: str) -> bool:
            msgs = [*system, {"role": "user", "content": text}]
            prompt = raw_prompt(msgs) if raw else engine.render(GenerationRequest(messages=msgs))
            return len(engine.tokenize(prompt)) <= budget

    with bar(f"checks {res.name}", None) as advance:
        rows = run_checks(lambda reqs: settled(engine, reqs), data.prompts, res.answers, json_task=data.json_task,
                          max_new_tokens=max_new_tokens, seed=seed, fits=fits, raw=raw_prompt if raw else None)
        advance(len(rows))
    res.checks = rows
    out = [MetricSamples.mean("checks", [r["passed"] for r in rows])]
    names: list[str] = []
    for r in rows:
        if r["check"] not in names:
            names.append(r["check"])
    for name in names:
        out.append(MetricSamples.ratio_of_sums(f"check.{name}", [float(r["passed"] and r["check"] == name) for r in rows],
                                               [float(r["check"] == name) for r in rows]))
    return out


# --- many models ---------------------------------------------------------------------------------------------


def display_name(ref: str, workspace=None) -> tuple[str, str | None]:
    """(a short name for `ref`, its artifact id when it is a workspace artifact)."""
    if ref.startswith(("http://", "https://")):
        from slmops.engines.openai_http import split_base_url

        base, model = split_base_url(ref)
        host = re.sub(r"^https?://", "", base).split("/")[0]
        return f"{model or 'server'}@{host}", None
    if workspace is not None:
        try:
            art = workspace.artifact_id(ref)
            if art is not None and workspace.registry.get(art) is None:
                art = None  # a folder with a manifest from another workspace: not ours to record into
        except SlmopsError:
            art = None
        if art is not None:
            return str(workspace.manifest(art).name or art), art
    p = Path(ref)
    return (p.stem if p.suffix == ".gguf" else p.name or ref), None


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "model"


def run_evaluation(
    models: list[str],
    data: str | Path | EvalData,
    *,
    metrics: list[str] | None = None,
    reference: str | None = None,
    baseline: str | None = None,
    gates: list[Gate] | None = None,
    workspace=None,
    out: str | Path | None = None,
    limit: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    json_schema: dict | str | Path | None = None,
    label_field: str | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    record: bool = True,
    progress: ProgressFactory | None = None,
    engine_options: dict[str, Any] | None = None,
) -> EvalRun:
    """Evaluate every model (and the baseline) on `data`, check `gates`, write `out` (eval.json, eval.md,
    examples-NAME.jsonl) and, with `record`, the scores and gate results into each artifact's manifest.
    Gate failures do not raise here: call ``run.raise_for_gates()``."""
    from slmops.engines import open_engine

    if not models:
        raise BadInputError("no model to evaluate", "pass --model MODEL (repeatable)")
    gates = list(gates or [])
    if any(g.kind == "max_drop" for g in gates) and baseline is None:
        raise BadInputError("a max-drop gate needs a baseline model", "pass --baseline MODEL")
    ev = data if isinstance(data, EvalData) else load_eval_data(data, limit=limit)
    names = resolve_metrics(metrics, ev, reference=reference is not None)
    if reference is not None and "agreement" not in names and ev.texts is None:
        names.append("agreement")
    for g in gates:  # measure what is gated
        base = g.metric.split(".")[0]
        group = {"field": "field_accuracy", "check": "checks"}.get(base) or next(
            (k for k, v in PRODUCES.items() if g.metric in v), g.metric)
        if group not in METRICS or g.metric == "agreement":
            known = [m for m in METRICS if m != "agreement"] + list(PRODUCES["agreement"])
            raise BadInputError(f"gate {g.expr!r}: unknown metric {g.metric!r}",
                                f"gate on one of: {', '.join(known)}, field.<name>, check.<name>")
        if group not in names:
            names.append(group)
    if gates:  # what the gates added must be measurable on this data, too
        names = resolve_metrics(names, ev, reference=reference is not None)
    if isinstance(json_schema, str | Path):
        schema_path = Path(json_schema)
        try:
            json_schema = json.loads(schema_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(f"cannot read JSON schema {schema_path}: {exc}") from exc
    if json_schema is not None:
        import jsonschema

        try:
            jsonschema.validators.validator_for(json_schema).check_schema(json_schema)
        except jsonschema.exceptions.SchemaError as exc:
            raise BadInputError(f"invalid JSON schema: {exc.message}") from exc

    engines: dict[str, Engine] = {}

    def engine_for(ref: str) -> Engine:
        if ref not in engines:
            engines[ref] = open_engine(ref, workspace=workspace, **(engine_options or {}))
        return engines[ref]

    opts = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, json_schema=json_schema,
                label_field=label_field, resamples=resamples, confidence=confidence, seed=seed, progress=progress)
    try:
        ref_run = None
        if reference is not None and ev.texts is None:
            eng = engine_for(reference)
            _, _, raw = template_label(eng, ev.prompts[0] if ev.prompts else None)
            bar = progress or (lambda desc, total: nullcontext(lambda n=1, **kw: None))
            with bar("answers (reference)", ev.n) as advance:
                ans = generate_answers(eng, ev.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       raw=raw, advance=advance)
            ref_run = ReferenceRun(reference, eng, ans, raw)
        used: set[str] = set()
        results: list[ModelEval] = []
        todo = [(m, "candidate") for m in dict.fromkeys(models)]
        if baseline is not None:
            todo.append((baseline, "baseline"))
        for ref, role in todo:
            shown, art = display_name(ref, workspace)
            unique = shown
            k = 2
            while slug(unique) in used:
                unique = f"{shown}-{k}"
                k += 1
            used.add(slug(unique))
            r = evaluate_model(engine_for(ref), ev, names, model=ref, name=unique, reference=ref_run, **opts)
            r.artifact_id, r.role = art, role
            results.append(r)
    finally:
        for eng in engines.values():
            try:
                eng.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
    cands = [r for r in results if r.role == "candidate"]
    base = next((r for r in results if r.role == "baseline"), None)
    for r in cands:
        r.gates = check_gates(r.values(), gates, base.values() if base else None, model=r.name) if gates else []
    from slmops.bench.results import machine_fingerprint

    run = EvalRun(data=str(ev.path), data_name=ev.name, metrics=names, models=cands, baseline=base,
                  reference=reference, machine=machine_fingerprint(),
                  settings={"max_new_tokens": max_new_tokens, "batch_size": batch_size, "greedy": True,
                            "resamples": resamples, "confidence": confidence, "seed": seed, "limit": limit,
                            "label_field": label_field, "json_schema": json_schema is not None,
                            "requested_metrics": names, "gates": [g.expr for g in gates]})
    if out is not None:
        write_outputs(run, out)
    if record and workspace is not None:
        record_in_workspace(run, workspace, gated=bool(gates))
    return run


# --- outputs -----------------------------------------------------------------------------------------------


def write_outputs(run: EvalRun, out: str | Path) -> Path:
    """eval.json, eval.md and examples-NAME.jsonl (per-example rows, then the check rows) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(run.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    (out / "eval.md").write_text(run.markdown(), encoding="utf-8")
    for m in run.all_models():
        with (out / f"examples-{slug(m.name)}.jsonl").open("w", encoding="utf-8") as f:
            for row in [*m.examples, *m.checks]:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return out


def record_in_workspace(run: EvalRun, workspace, *, gated: bool) -> list[str]:
    """Merge each artifact's scores into its manifest: metrics["eval"][data name] (value, _ci, n, template)
    and, when gates were checked, metrics["gates"]. Returns the artifact ids updated."""
    updated = []
    for m in run.all_models():
        if m.artifact_id is None:
            continue
        entry: dict[str, Any] = {}
        for k, s in m.scores.items():
            entry[k] = s.value
            entry[f"{k}_ci"] = s.ci()
        entry.update(n=m.n, template=m.template)
        current = workspace.manifest(m.artifact_id).metrics.get("eval")
        evals = dict(current) if isinstance(current, dict) else {}
        evals[run.data_name] = entry
        update: dict[str, Any] = {"eval": evals}
        if gated and m.role == "candidate":
            update["gates"] = {"passed": all(g.passed for g in m.gates), "data": run.data_name,
                               "checks": [g.to_dict() for g in m.gates]}
        workspace.update_metrics(m.artifact_id, update)
        updated.append(m.artifact_id)
    return updated


def fmt_score(s: Score | None, metric: str = "") -> str:
    if s is None or s.value is None:
        return "-"

    def f(x: float) -> str:
        if metric == "bleu":
            return f"{x:.2f}"
        if metric == "mean_kl":
            return f"{x:.3g}"
        return f"{x:.3f}" if abs(x) < 100 else f"{x:.4g}"

    if s.low is None or s.high is None or (s.low == s.high == s.value):
        return f(s.value)
    return f"{f(s.value)} ({f(s.low)}-{f(s.high)})"


def main_metrics(run: EvalRun) -> list[str]:
    """The score names shown in tables: everything but the per-field / per-check breakdowns."""
    return [k for k in run.score_names() if not k.startswith(("field.", "check."))]


def eval_markdown(run: EvalRun) -> str:
    conf = int(round(run.settings.get("confidence", 0.95) * 100))
    lines = [f"# Evaluation on {run.data_name}", "",
             f"Data: `{run.data}` ({run.models[0].n if run.models else 0} examples). Greedy answers, at most "
             f"{run.settings.get('max_new_tokens')} new tokens. Values with their {conf}% bootstrap interval "
             f"({run.settings.get('resamples')} resamples, seed {run.settings.get('seed')}).", ""]
    cols = main_metrics(run)
    lines.append("| model | engine | " + " | ".join(cols) + " |")
    lines.append("| --- | --- | " + " | ".join("---:" for _ in cols) + " |")
    for m in run.all_models():
        label = m.name + (" (baseline)" if m.role == "baseline" else "")
        lines.append(f"| {label} | {m.engine} {m.precision} | "
                     + " | ".join(fmt_score(m.scores.get(c), c) for c in cols) + " |")
    detail = [k for k in run.score_names() if k.startswith(("field.", "check."))]
    if detail:
        lines += ["", "| breakdown | " + " | ".join(m.name for m in run.all_models()) + " |",
                  "| --- | " + " | ".join("---:" for _ in run.all_models()) + " |"]
        for k in detail:
            lines.append(f"| {k} | " + " | ".join(fmt_score(m.scores.get(k), k) for m in run.all_models()) + " |")
    lines += ["", "## Prompt rendering", ""]
    for m in run.all_models():
        lines.append(f"- **{m.name}** (`{m.model}`): {m.template}")
    if run.gate_results:
        lines += ["", "## Gates", "", f"**{'passed' if run.passed else 'FAILED'}**", ""]
        for g in run.gate_results:
            lines.append(f"- {'PASS' if g.passed else 'FAIL'} `{g.expr}`: {g.reason}")
    notes = [(m.name, n) for m in run.all_models() for n in m.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {name}: {n}" for name, n in notes]
    from slmops.bench.results import machine_line

    lines += ["", f"Machine: {machine_line(run.machine)}" if run.machine else "", ""]
    return "\n".join(lines)


__all__ = ["EvalData", "EvalRun", "ModelEval", "ReferenceRun", "default_metrics", "evaluate_model",
           "generate_answers", "load_eval_data", "perplexity_stats", "record_in_workspace", "resolve_metrics",
           "run_evaluation", "write_outputs"]
