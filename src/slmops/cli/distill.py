"""`slmops distill ...`: the distillation sub-app and `distill generate` (stage 1); `distill train` is added
by cli/distill_train.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app

distill_app = typer.Typer(
    help="Distill a teacher into a smaller student: generate synthetic data (stage 1), train the student (stage 2).",
    no_args_is_help=True,
)
app.add_typer(distill_app, name="distill")


@distill_app.command("generate")
def generate(
    teacher: Annotated[list[str], typer.Option("--teacher", help="Teacher: artifact id/alias, model folder, or an OpenAI-compatible base URL (http://host:8000/v1, optionally #model). Repeat for several teachers (their answers are pooled and voted on).")],
    prompts: Annotated[Path, typer.Option("--prompts", help="Prompt file (JSONL/JSON/CSV/Parquet; chat, prompt or input fields; validated first).")],
    out: Annotated[Path, typer.Option("--out", help="Working folder: generations.jsonl (resumable), failures.jsonl, train.jsonl, rejected.jsonl, summary.json.")],
    template: Annotated[str | None, typer.Option(help="Render prompts from other columns with a template, e.g. \"Classify: {text}\".")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System message added to prompts that have none.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 256,
    num_samples: Annotated[int, typer.Option(help="Samples per prompt and teacher (K), for majority vote.")] = 1,
    seed: Annotated[int, typer.Option(help="Base seed; sample k of a prompt uses a seed derived from it.")] = 0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable, at most 4).")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once (URL teachers).")] = 8,
    api_key: Annotated[str | None, typer.Option(help="API key for URL teachers (default: $SLMOPS_API_KEY or $OPENAI_API_KEY).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before a request times out (and is retried).")] = 60.0,
    max_retries: Annotated[int, typer.Option(help="Retries on 429/5xx/connection errors/timeouts.")] = 5,
    max_rps: Annotated[float | None, typer.Option(help="Most requests per second to a URL teacher.")] = None,
    backoff_base: Annotated[float, typer.Option(help="First retry waits up to this many seconds (doubling, with jitter).")] = 0.5,
    backoff_max: Annotated[float, typer.Option(help="Longest wait between retries, in seconds.")] = 20.0,
    batch_size: Annotated[int, typer.Option(help="Batch size for local teachers.")] = 16,
    min_success: Annotated[float, typer.Option(help="Fail (exit 1) when fewer than this share of prompts succeed.")] = 0.9,
    json_valid: Annotated[bool, typer.Option("--json/--no-json", help="Keep only answers that parse as JSON.")] = False,
    json_schema: Annotated[Path | None, typer.Option(help="JSON schema file answers must match (implies --json).")] = None,
    regex: Annotated[str | None, typer.Option(help="Keep only answers this regular expression matches (re.search).")] = None,
    min_chars: Annotated[int | None, typer.Option(help="Shortest answer kept, in characters.")] = None,
    max_chars: Annotated[int | None, typer.Option(help="Longest answer kept, in characters.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer folder for --min/--max-answer-tokens.")] = None,
    min_answer_tokens: Annotated[int | None, typer.Option(help="Shortest answer kept, in tokens (needs --tokenizer).")] = None,
    max_answer_tokens: Annotated[int | None, typer.Option(help="Longest answer kept, in tokens (needs --tokenizer).")] = None,
    refusals: Annotated[bool, typer.Option("--refusals/--no-refusals", help="Drop answers that open with a refusal (\"I'm sorry\", \"As an AI\"...).")] = True,
    keep_truncated: Annotated[bool, typer.Option(help="Keep answers cut off by --max-tokens.")] = False,
    dedup: Annotated[bool, typer.Option("--dedup/--no-dedup", help="Drop exact duplicates (normalised prompt + answer).")] = True,
    near_dup_threshold: Annotated[float | None, typer.Option(help="Drop prompts whose character 5-gram Jaccard similarity to an earlier kept prompt is at least this (e.g. 0.9).")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Drop prompts where fewer than this share of all samples agree with the majority answer.")] = None,
    name: Annotated[str | None, typer.Option(help="Name for the dataset artifact (default: distill-<out folder>).")] = None,
    register: Annotated[bool, typer.Option("--register/--no-register", help="Register the dataset as a workspace artifact.")] = True,
) -> None:
    """Generate training data with one or more teachers, check and filter it, and register the dataset.

    Resumable: rerun the same command after a crash or kill and it continues where it stopped (no prompt lost, none duplicated). Exits 1 when fewer than --min-success of the prompts succeed (what succeeded is kept). See docs/distill.md.

    Examples:\n
      slmops distill generate --teacher http://127.0.0.1:8000/v1 --prompts prompts.jsonl --out runs/d1 --concurrency 32\n
      slmops distill generate --teacher teacher@prod --teacher http://gpu:8000/v1 --prompts p.jsonl --out runs/d2 --num-samples 3 --temperature 0.7 --json --min-agreement 0.6
    """
    from rich.table import Table

    from slmops.data import load_dataset_file
    from slmops.distill import FilterConfig, build_dataset, generate_synthetic, open_teacher, register_dataset

    filters = FilterConfig(
        json_valid=json_valid, json_schema=json_schema, regex=regex, min_chars=min_chars, max_chars=max_chars,
        min_tokens=min_answer_tokens, max_tokens=max_answer_tokens, tokenizer=tokenizer, refusals=refusals,
        drop_truncated=not keep_truncated, dedup=dedup, near_dup_threshold=near_dup_threshold,
        min_agreement=min_agreement,
    )
    if num_samples > 1 and temperature == 0:
        common.info("note: --num-samples > 1 with --temperature 0 asks for the same greedy answer K times")
    prompt_rows = load_dataset_file(prompts, template=template, purpose="prompts").prompts()
    ws = common.get_workspace()
    opened = []
    try:
        for ref in teacher:
            opened.append(open_teacher(
                ref, ws, concurrency=concurrency, api_key=api_key, timeout=timeout, max_retries=max_retries,
                max_rps=max_rps, backoff_base=backoff_base, backoff_max=backoff_max, max_batch_size=batch_size,
            ))
        common.info(f"teachers: {', '.join(t.name for t in opened)}; {len(prompt_rows)} prompts -> {out}")
        with common.progress("generating", total=None) as advance:
            report = generate_synthetic(
                opened, prompt_rows, out, system_prompt=system_prompt, temperature=temperature, top_p=top_p,
                max_new_tokens=max_tokens, num_samples=num_samples, seed=seed, stop=stop, batch_size=batch_size,
                min_success=min_success, progress=advance, workspace=ws,
            )
    finally:
        for t in opened:
            t.engine.close()
    if report.repair.any:
        common.info(f"repaired {out}/generations.jsonl: torn last line {report.repair.torn_last_line}, "
                    f"{report.repair.bad_lines} bad and {report.repair.duplicate_lines} duplicate lines dropped")
    common.info(f"generated {report.generated}, already done {report.done_before}, failed {report.failed} "
                f"of {report.total} in {report.elapsed_s:.1f} s")
    if report.failed:
        common.info("failures (rerun the same command to retry them):\n" + "\n".join(
            f"  {n} x {err}" for err, n in sorted(report.errors.items(), key=lambda kv: -kv[1])))
    outcome = build_dataset(out, report.hashes, filters)
    summary = outcome.summary
    table = Table("", "prompts", title=f"kept {summary['kept']} of {summary['total']}")
    table.add_row("kept", str(summary["kept"]))
    for reason, n in summary["rejected"].items():
        table.add_row(f"rejected: {reason}", str(n))
    if summary.get("agreement_mean") is not None:
        table.add_row("mean agreement", f"{summary['agreement_mean']:.3f}")
    common.console.print(table)
    common.console.print(f"train data: {out / 'train.jsonl'}  (rejected: {out / 'rejected.jsonl'})")
    if not register:
        return
    config = {
        "teachers": [t.name for t in opened], "teacher_refs": list(teacher), "prompts": str(prompts),
        "template": template, "system_prompt": system_prompt, "sampling": report.sampling,
        "concurrency": concurrency, "timeout": timeout, "max_retries": max_retries, "max_rps": max_rps,
        "min_success": min_success, "filters": filters.to_dict(), "out": str(out),
    }
    manifest, created = register_dataset(ws, out, name=name, config=config, hashes=report.hashes,
                                         parents=[t.artifact_id for t in opened if t.artifact_id])
    verb = "registered" if created else "unchanged, already registered as"
    common.console.print(f"{verb} [bold]{manifest.id}[/] ({manifest.name})")
