"""`slmops data validate|inspect|split|from-capture`: a thin layer over `slmops.data`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from slmops.cli import common
from slmops.cli.app import app
from slmops.errors import BadInputError

data_app = typer.Typer(
    help="Validate, inspect and split datasets: JSONL, JSON, CSV, Parquet or a Hugging Face dataset folder.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

FileArg = Annotated[Path, typer.Argument(help="Data file (.jsonl .json .csv .parquet) or HF dataset folder.")]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format", "-f",
        help="chat | prompt-completion | input-output | template | prompt (default: detected from the keys).",
    ),
]
TemplateOpt = Annotated[
    str | None,
    typer.Option("--template", help='Render the user prompt from any columns: "Question: {question}".'),
]
CompletionOpt = Annotated[
    str | None,
    typer.Option("--completion-field", help="With --template: the answer column (default: output, if present)."),
]
PurposeOpt = Annotated[
    str,
    typer.Option(
        "--purpose",
        help="train (every record needs an answer) | prompts (answers optional) | auto (train if any has one).",
    ),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Split of a Hugging Face DatasetDict folder.")]
TokenizerOpt = Annotated[
    Path | None, typer.Option("--tokenizer", help="Tokenizer folder (AutoTokenizer) for token lengths.")
]


def _out(line: str) -> None:
    """Print one plain line of results (no markup, no wrapping: `file:line: reason` stays whole)."""
    common.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)


@data_app.command("validate")
def validate(
    file: FileArg,
    fmt: FormatOpt = None,
    template: TemplateOpt = None,
    completion_field: CompletionOpt = None,
    purpose: PurposeOpt = "auto",
    split: SplitOpt = "train",
    tokenizer: TokenizerOpt = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", min=1, help="With --tokenizer: flag records longer than N tokens "
                                                  "(default: the tokenizer's model_max_length)."),
    ] = None,
) -> None:
    """Check every record and list each problem as `file:line: reason`; exit 2 if any record is bad."""
    from slmops.data import validate_file

    report = validate_file(
        file, fmt, template, completion_field,
        purpose=purpose, split=split, tokenizer=tokenizer, max_tokens=max_tokens,
    )
    how = "detected" if report.format_detected else "given"
    common.info(f"format: {report.format} ({how}), purpose: {report.purpose}")
    for problem in report.problems:
        _out(str(problem))
    if not report.ok:  # the app prints the summary as the error message and exits 2
        raise BadInputError(report.summary())
    _out(report.summary())


def _fmt_pcts(stats: dict[str, int] | None) -> list[str]:
    return [str(stats[k]) for k in ("p50", "p90", "p99", "max")] if stats else ["-"] * 4


def _texts(*values: Any) -> list[Any]:
    """Table cells as plain Text, so paths such as `ds[train]` are not read as rich markup."""
    from rich.text import Text

    return [Text(str(v)) for v in values]


def _print_stats(stats: dict[str, Any]) -> None:
    from rich.table import Table

    overview = Table(title=_texts(stats["path"])[0], show_header=False)
    overview.add_column("", style="bold")
    overview.add_column("")
    roles = stats["messages_per_role"]
    turns = stats["turns"]
    rows = [
        ("records", str(stats["records"])),
        ("format", f"{stats['format']} ({stats['purpose']})"),
        ("with completion", str(stats["with_completion"])),
        ("messages system/user/assistant", f"{roles['system']} / {roles['user']} / {roles['assistant']}"),
        ("user turns min/mean/max", f"{turns['min']} / {turns['mean']} / {turns['max']}"),
        ("multi-turn records", str(turns["multi_turn"])),
        ("duplicate prompts", str(stats["duplicates"]["prompts"])),
        ("duplicate records", str(stats["duplicates"]["records"])),
    ]
    for name, value in rows:
        overview.add_row(*_texts(name, value))
    common.console.print(overview)
    lengths = Table(title="lengths")
    for col in ("", "p50", "p90", "p99", "max"):
        lengths.add_column(col, justify="right" if col else "left")
    for unit in ("chars", "tokens"):
        if stats[unit] is None:
            continue
        for part in ("prompt", "completion"):
            lengths.add_row(*_texts(f"{part} {unit}", *_fmt_pcts(stats[unit][part])))
    common.console.print(lengths)


@data_app.command("inspect")
def inspect(
    file: FileArg,
    fmt: FormatOpt = None,
    template: TemplateOpt = None,
    completion_field: CompletionOpt = None,
    purpose: PurposeOpt = "auto",
    split: SplitOpt = "train",
    tokenizer: TokenizerOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")] = False,
) -> None:
    """Counts, roles and turns, duplicates and length percentiles of a (valid) data file."""
    from slmops.data import inspect_file

    stats = inspect_file(
        file, fmt, template, completion_field, purpose=purpose, split=split, tokenizer=tokenizer
    )
    if as_json:
        typer.echo(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        _print_stats(stats)


@data_app.command("split")
def split_cmd(
    file: FileArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for train/val/test.jsonl.")],
    val: Annotated[float, typer.Option("--val", help="Fraction of records for val.jsonl (0 = none).")] = 0.1,
    test: Annotated[float, typer.Option("--test", help="Fraction of records for test.jsonl (0 = none).")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Shuffle seed; same inputs give identical files.")] = 0,
    stratify: Annotated[
        str | None,
        typer.Option("--stratify", help="Split each value of this field (or dotted path) in the same proportions."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty output folder.")] = False,
    fmt: FormatOpt = None,
    template: TemplateOpt = None,
    completion_field: CompletionOpt = None,
    purpose: PurposeOpt = "auto",
    split: SplitOpt = "train",
) -> None:
    """Validate FILE, then write its original records to train/val/test.jsonl (deterministic by seed)."""
    from rich.table import Table

    from slmops.data import split_file

    result = split_file(
        file, out, val=val, test=test, seed=seed, stratify=stratify, force=force,
        fmt=fmt, template=template, completion_field=completion_field, purpose=purpose, split=split,
    )
    table = Table(title=_texts(f"split of {file} (seed {seed})")[0])
    table.add_column("split")
    table.add_column("records", justify="right")
    table.add_column("file")
    if stratify:
        table.add_column(f"by {stratify}")
    for name, path in result.paths.items():
        row = [name, str(result.counts[name]), str(path)]
        if stratify:
            row.append(", ".join(f"{k}: {n}" for k, n in result.strata[name].items()))
        table.add_row(*_texts(*row))
    common.console.print(table)


@data_app.command("from-capture")
def from_capture(
    files: Annotated[list[Path], typer.Argument(help="Capture files written by `slmops serve --capture FILE` (JSONL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Prompt file to write (JSONL), for `slmops distill generate --prompts`.")],
    train: Annotated[list[Path] | None, typer.Option("--train", help="Training (or earlier prompt) file to measure drift against; repeatable.")] = None,
    redact: Annotated[str, typer.Option("--redact", help="pii (mask e-mails, phone/card numbers) | none | module:function (your hook; None drops). (default: pii)")] = "pii",
    min_similarity: Annotated[float, typer.Option("--min-similarity", help="A captured prompt is 'unlike' the training data when its best character 5-gram Jaccard similarity to any training prompt is below this; see docs/operations.md for how it was chosen. (default: 0.3)")] = 0.3,
    near_dup_threshold: Annotated[float, typer.Option("--near-dup-threshold", help="Merge prompts at least this similar (character 5-gram Jaccard) to an earlier one; 0 = exact duplicates only. (default: 0.9)")] = 0.9,
    model: Annotated[str | None, typer.Option("--model", help="Keep only requests served as this model name (metadata.model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole summary as JSON.")] = False,
) -> None:
    """Turn captured production traffic into the prompt file of the next distillation.

    Keeps each request's prompt (the messages without the answer), redacted, de-duplicated (exact after normalising whitespace and case, then near duplicates), and writes OUT plus OUT.drift.json. With --train, the drift summary says which share of captured prompts is unlike the training prompts (see docs/operations.md).

    Examples:\n
      slmops data from-capture capture.jsonl --out next/prompts.jsonl --train data/train.jsonl\n
      slmops data from-capture day1.jsonl day2.jsonl --out p.jsonl --redact myhooks:scrub --min-similarity 0.4\n
      slmops distill generate --teacher teacher@production --prompts next/prompts.jsonl --out runs/d2
    """
    from rich.markup import escape
    from rich.table import Table

    from slmops.data.capture import prompts_from_capture

    res = prompts_from_capture(files, out, train=train, redact=redact, min_similarity=min_similarity,
                               near_dup_threshold=near_dup_threshold, model=model)
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2, ensure_ascii=False))
        return
    table = Table("", "count", title=_texts(f"{res.records} captured records -> {res.written} prompts")[0])
    for reason, n in res.skipped.items():
        table.add_row(f"skipped: {reason}", str(n))
    table.add_row(f"redacted ({res.redaction})", str(res.redacted))
    table.add_row("exact duplicates merged", str(res.exact_duplicates))
    table.add_row("near duplicates merged", str(res.near_duplicates))
    table.add_row("prompts written", str(res.written))
    common.console.print(table)
    d = res.drift
    if d is None:
        common.console.print("drift: not measured (pass --train FILE)", highlight=False)
    else:
        _out(f"drift: {d.unlike} of {d.captured} distinct captured prompts ({d.share_unlike:.1%}; "
             f"{d.share_unlike_requests:.1%} of {d.requests} requests) are unlike the {d.training_prompts} training "
             f"prompts (best 5-gram Jaccard similarity < {d.min_similarity:g}; median {d.similarity['median']:.2f})")
        for ex in d.examples:
            text = " ".join(ex["prompt"].split())
            _out(f"  {ex['similarity']:.2f}  {text[:100]}{'...' if len(text) > 100 else ''}")
    common.console.print(f"prompts: {escape(str(res.out))}  drift summary: {escape(str(res.drift_path))}",
                         highlight=False)
