"""`slmops distill run`: both stages, then teacher vs student side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.distill import distill_app


@distill_app.command("run")
def run_cmd(
    teacher: Annotated[str, typer.Option(help="Teacher: artifact id/alias, model folder, or OpenAI-compatible base URL.")],
    prompts: Annotated[Path, typer.Option(help="Unlabeled prompt file (any format `slmops data` reads).")],
    out: Annotated[Path, typer.Option(help="Working folder: synthetic/, student/, report.md, report.json.")],
    test: Annotated[Path | None, typer.Option(help="Held-out labelled file to compare teacher and student on.")] = None,
    student: Annotated[str | None, typer.Option(help="Existing student model (else --student-preset).")] = None,
    student_preset: Annotated[str, typer.Option(help="Preset for a new student, with the teacher's tokenizer.")] = "demo-student",
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer for a preset student of a URL teacher.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per teacher answer.")] = 128,
    temperature: Annotated[float, typer.Option(help="Teacher sampling temperature (0 = greedy).")] = 0.0,
    json_valid: Annotated[bool, typer.Option("--json/--no-json", help="Keep only teacher answers that parse as JSON.")] = False,
    keep_truncated: Annotated[bool, typer.Option(help="Keep teacher answers cut off by --max-tokens.")] = False,
    max_steps: Annotated[int, typer.Option(help="Student optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Student sequences per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Student peak learning rate.")] = 2e-3,
    kd_alpha: Annotated[float | None, typer.Option(help="Weight of logit-level KD (default 0.5 for a local teacher, 0 for a URL).")] = None,
    kd_temperature: Annotated[float, typer.Option(help="KD softmax temperature.")] = 2.0,
    eval_limit: Annotated[int | None, typer.Option(help="Compare on only the first N test examples.")] = None,
) -> None:
    """Distill end to end: label the prompts with the teacher, filter, train the student, compare them.

    The comparison table (task metric, parameters, size, latency, decode tokens/s, peak memory, retention
    and speed-up) is printed and written to <out>/report.md and report.json.

    Example:\n
      slmops distill run --teacher demo-teacher --prompts data/prompts.jsonl --test data/test.jsonl --out runs/d1 --json
    """
    from slmops.distill import FilterConfig
    from slmops.distill.run import run_distillation

    training = {"max_steps": max_steps, "batch_size": batch_size, "lr": lr, "kd_temperature": kd_temperature,
                "max_length": 256}
    if kd_alpha is not None:
        training["kd_alpha"] = kd_alpha
    if tokenizer:
        training["tokenizer"] = tokenizer
    outcome = run_distillation(
        teacher, prompts, out, workspace=common.get_workspace(), student=student, student_preset=student_preset,
        test=test, filters=FilterConfig(json_valid=json_valid, drop_truncated=not keep_truncated), eval_limit=eval_limit,
        generation={"max_new_tokens": max_tokens, "temperature": temperature}, training=training,
        progress=None if common.STATE.quiet else common.progress, log=common.info,
    )
    if outcome.report_md:
        common.console.print(outcome.report_md.read_text())
    common.console.print(f"student: {outcome.student_id or outcome.student_dir}")
