"""`slmops eval`: task metrics with bootstrap intervals, perplexity, agreement, behaviour checks and quality
gates, for any number of models measured the same way (a thin layer over slmops.evaluate.suite)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app

_METRICS_HELP = (
    "Comma-separated metrics (repeatable): exact_match, json_valid, field_accuracy, token_f1, rouge_l, bleu, "
    "accuracy, perplexity, agreement, checks (default: exact_match, json_valid, field_accuracy for JSON answers; "
    "exact_match, token_f1 for text answers; perplexity for a .txt file)."
)


@app.command("eval")
def eval_command(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Model to evaluate (repeatable): artifact id/alias, model folder, .gguf file, ONNX export folder or server URL `URL#model`.")],
    data: Annotated[Path, typer.Option(help="Evaluation data: chat JSONL (last assistant turn = reference answer), prompt-completion, input-output, ... or a .txt file of texts (perplexity).")],
    metrics: Annotated[list[str] | None, typer.Option("--metrics", help=_METRICS_HELP)] = None,
    reference: Annotated[str | None, typer.Option(help="Reference model for `agreement`: output match, top-1 agreement and mean KL(reference || model) (adds the agreement metric).")] = None,
    gate: Annotated[list[str] | None, typer.Option("--gate", help="Quality gate METRIC OP NUMBER, repeatable, e.g. \"exact_match>=0.9\" (ops: >=, >, <=, <, ==). A failing gate exits 3.")] = None,
    baseline: Annotated[str | None, typer.Option(help="Baseline model for --max-drop gates (evaluated the same way and shown beside).")] = None,
    max_drop: Annotated[list[str] | None, typer.Option("--max-drop", help="Relative gate METRIC=DROP, repeatable: the model may score at most DROP (absolute) below --baseline, e.g. exact_match=0.02.")] = None,
    gates: Annotated[Path | None, typer.Option("--gates", help="Gates YAML file: `gates: [{metric: exact_match, min: 0.9}]`, `max_drop: {exact_match: 0.02}`, `baseline: MODEL`.")] = None,
    json_schema: Annotated[Path | None, typer.Option(help="JSON schema file: json_valid then means valid under this schema.")] = None,
    label_field: Annotated[str | None, typer.Option(help="For accuracy: the JSON field holding the class label (default: the whole answer is the label).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write eval.json, eval.md and examples-NAME.jsonl (per-example results) into this folder.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N records (default: all).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit, in tokens (default: 128).")] = 128,
    batch_size: Annotated[int, typer.Option(help="Prompts per engine.generate call (default: 16).")] = 16,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the intervals; 0 for none (default: 1000).")] = 1000,
    confidence: Annotated[float, typer.Option(help="Interval confidence level (default: 0.95).")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and of the garbage check prompts (default: 0).")] = 0,
    record: Annotated[bool, typer.Option("--record/--no-record", help="Write scores and gate results into the manifest of each model that is a workspace artifact (default: record).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the eval.json content instead of tables.")] = False,
) -> None:
    """Evaluate one or more models on a data file, with bootstrap intervals and quality gates.

    Every model answers greedily, in batches, through its engine (torch, ONNX Runtime GenAI, llama.cpp or a server); prompts go through each model's own chat template (the table says which). Every metric gets a 95% bootstrap interval, and per-example results are kept (--out).

    Gates (--gate, --max-drop with --baseline, --gates FILE) fail with exit code 3 and one line per failed gate, so a CI step stops; results go into each artifact's manifest for promotion. See docs/evaluate.md.

    Examples:\n
      slmops eval -m demo-teacher --data data/test.jsonl\n
      slmops eval -m runs/student -m exports/student-int4 --data data/test.jsonl --out eval/ --gate "exact_match>=0.9"\n
      slmops eval -m exports/student-int4 --baseline runs/student --max-drop exact_match=0.02 --data data/test.jsonl\n
      slmops eval -m http://127.0.0.1:8000/v1#student --data data/test.jsonl --metrics exact_match,checks\n
      slmops eval -m runs/student --reference demo-teacher --data data/test.jsonl --metrics agreement,perplexity\n
      slmops eval -m runs/student --data data/test.jsonl --gates gates.yaml
    """
    from slmops.errors import BadInputError
    from slmops.evaluate.gates import load_gates_file, parse_gate, parse_max_drop
    from slmops.evaluate.suite import run_evaluation

    if batch_size < 1 or max_new_tokens < 1:
        raise BadInputError("--batch-size and --max-new-tokens must be >= 1")
    if resamples < 0:
        raise BadInputError("--resamples must be >= 0")
    if not 0 < confidence < 1:
        raise BadInputError(f"--confidence must be between 0 and 1, got {confidence}")
    gate_list = [parse_gate(g) for g in gate or []] + [parse_max_drop(d) for d in max_drop or []]
    if gates is not None:
        spec = load_gates_file(gates)
        gate_list += spec.to_gates()
        baseline = baseline or spec.baseline
    ws = common.get_workspace()
    run = run_evaluation(
        model, data, metrics=metrics, reference=reference, baseline=baseline, gates=gate_list, workspace=ws,
        out=out, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, json_schema=json_schema,
        label_field=label_field, resamples=resamples, confidence=confidence, seed=seed, record=record,
        progress=common.progress,
    )
    if as_json:
        typer.echo(json.dumps(run.to_dict(), indent=2, default=str))
    else:
        _print(run)
        if out is not None:
            common.info(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and the per-example results")
    run.raise_for_gates()


def _print(run) -> None:
    from rich.markup import escape
    from rich.table import Table

    from slmops.evaluate.suite import fmt_score, main_metrics

    conf = int(round(run.settings["confidence"] * 100))
    table = Table(title=f"{run.data_name}: {run.models[0].n if run.models else 0} examples "
                        f"(value and {conf}% bootstrap interval)", title_justify="left")
    table.add_column("model")
    table.add_column("engine")
    cols = main_metrics(run)
    for c in cols:
        table.add_column(c, justify="right")
    for m in run.all_models():
        label = m.name + (" (baseline)" if m.role == "baseline" else "")
        table.add_row(escape(label), escape(f"{m.engine} {m.precision}"), *[fmt_score(m.scores.get(c), c) for c in cols])
    common.console.print(table)
    detail = [k for k in run.score_names() if k.startswith(("field.", "check."))]
    if detail:
        sub = Table(title="breakdown", title_justify="left")
        sub.add_column("score")
        for m in run.all_models():
            sub.add_column(escape(m.name), justify="right")
        for k in detail:
            sub.add_row(k, *[fmt_score(m.scores.get(k), k) for m in run.all_models()])
        common.console.print(sub)
    for m in run.all_models():
        common.console.print(f"{m.name}: {m.template}", markup=False, highlight=False)
        for note in m.notes:
            common.info(f"note ({m.name}): {note}")
    for g in run.gate_results:
        if g.passed:
            common.console.print(g.reason, markup=False, highlight=False)
