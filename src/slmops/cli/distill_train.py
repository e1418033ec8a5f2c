"""`slmops distill train`: stage 2, train a student on the teacher's outputs (optionally with logit KD)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from slmops.cli import common
from slmops.cli.distill import distill_app
from slmops.errors import BadInputError


def _resolved_config(config_file: Path | None, flags: dict[str, Any]):
    """The recipe (if any) with the flags that were given laid over it, validated as a whole."""
    from pydantic import ValidationError

    from slmops.config import format_validation_error, load_yaml_config
    from slmops.distill.train import StudentTrainConfig

    base: dict[str, Any] = {}
    if config_file is not None:
        base = load_yaml_config(config_file, StudentTrainConfig).model_dump(exclude_unset=True)
    given = {k: v for k, v in flags.items() if v is not None}
    if given.get("student") is not None:
        base.pop("student_preset", None)
    if given.get("student_preset") is not None:
        base.pop("student", None)
    try:
        return StudentTrainConfig.model_validate({**base, **given})
    except ValidationError as exc:
        source = f"{config_file} + command line" if config_file else "command line"
        raise BadInputError("invalid options:\n" + format_validation_error(exc, source),
                            "see `slmops distill train --help`") from exc


@distill_app.command("train")
def train(
    out: Annotated[Path, typer.Option(help="Output folder: the trained student (HF layout), training.json, checkpoints/.")],
    student: Annotated[str | None, typer.Option(help="Student model: artifact id/alias, folder or hub id.")] = None,
    student_preset: Annotated[str | None, typer.Option(help="Create the student from a preset (e.g. demo-student) with the teacher's tokenizer.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer for --student-preset when no --teacher is given.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher for logit-level KD (a local model with the student's tokenizer).")] = None,
    data: Annotated[str | None, typer.Option(help="Training chat data: a file, or a folder with train.jsonl (val.jsonl beside it validates).")] = None,
    val_data: Annotated[str | None, typer.Option(help="Validation data file (default: val.jsonl beside --data, else --val-fraction).")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Fraction of --data held out for validation when no validation file (default: 0.05).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs over the data (default: 1).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per device per micro-batch (default: 8).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step (default: 1).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW) (default: 5e-4).")] = None,
    warmup_ratio: Annotated[float | None, typer.Option(help="Warm-up share of the steps (default: 0.03).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (default: 0.01).")] = None,
    lr_scheduler: Annotated[str | None, typer.Option(help="cosine, linear, constant or constant_with_warmup (default: cosine).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per example; longer ones are truncated (default: 512).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the split, data order and a preset's weights (default: 0).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Validate every N steps (default: once per epoch).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (default: at each validation, and at the end).")] = None,
    save_total_limit: Annotated[int | None, typer.Option(help="Checkpoints kept (default: 2).")] = None,
    early_stopping_patience: Annotated[int | None, typer.Option(help="Stop after N validations without improvement; keep the best.")] = None,
    resume: Annotated[bool | None, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint in OUT/checkpoints.")] = None,
    kd_alpha: Annotated[float | None, typer.Option(help="Weight of the logit KD term, 0..1 (0 = sequence-level only) (default: 0.5).")] = None,
    kd_temperature: Annotated[float | None, typer.Option(help="Softmax temperature of the KD term (default: 2).")] = None,
    kd_loss: Annotated[str | None, typer.Option(help="forward (KL teacher||student), reverse or jsd (default: forward).")] = None,
    allow_seq_level: Annotated[bool | None, typer.Option("--allow-seq-level/--no-allow-seq-level", help="With an incompatible teacher tokenizer, train without logit KD instead of failing.")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 mixed precision (GPUs; slower on most CPUs).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    logging_steps: Annotated[int | None, typer.Option(help="Log the loss every N steps (default: 10).")] = None,
    name: Annotated[str | None, typer.Option(help="Name to register the student under (default: OUT's folder name).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Recipe YAML with these options (snake_case keys); flags override it.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit; loads nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the training report as JSON.")] = False,
) -> None:
    """Train a student on the teacher's kept outputs: loss on assistant tokens only, plus logit KD with --teacher.

    The teacher's and student's tokenizers and chat templates are compared before any weight loads; a mismatch fails with what differs, or trains without logit KD with --allow-seq-level. Runs unchanged under `accelerate launch` (data parallel; only the main process writes the model and registers it).

    Examples:\n
      slmops distill train --student-preset demo-student --teacher demo-teacher --data runs/synthetic --out runs/student\n
      slmops distill train --config recipe.yaml --out runs/student --kd-alpha 0.8 --resume\n
      accelerate launch --num_processes 2 -m slmops distill train --student M --data d.jsonl --out runs/s
    """
    flags = dict(
        student=student, student_preset=student_preset, tokenizer=tokenizer, teacher=teacher, data=data,
        val_data=val_data, val_fraction=val_fraction, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
        lr_scheduler=lr_scheduler, max_length=max_length, seed=seed, eval_every=eval_every,
        save_every=save_every, save_total_limit=save_total_limit, early_stopping_patience=early_stopping_patience,
        resume=resume, kd_alpha=kd_alpha, kd_temperature=kd_temperature, kd_loss=kd_loss,
        allow_seq_level_fallback=allow_seq_level, bf16=bf16, threads=threads, logging_steps=logging_steps,
        name=name,
    )
    cfg = _resolved_config(config, flags)
    if dry_run:
        import yaml

        typer.echo(f"# slmops distill train --out {out}  (dry run: nothing loaded)")
        typer.echo(yaml.safe_dump(cfg.model_dump(), sort_keys=False).rstrip())
        return

    from slmops.distill.train import train_student

    main = os.environ.get("RANK", "0") == "0"  # under accelerate launch / torchrun only rank 0 reports
    ws = common.get_workspace()
    if main and not common.STATE.quiet:
        with common.progress("training student", total=None) as advance:
            report = train_student(cfg, out, workspace=ws, progress=advance)
    else:
        report = train_student(cfg, out, workspace=ws)
    if not main:
        return
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    val = f", val loss {report.val_loss:.4f}" if report.val_loss is not None else ""
    train_loss = f"{report.train_loss:.4f}" if report.train_loss is not None else "-"
    common.console.print(
        f"student [bold]{report.artifact_id or out}[/]: {report.parameters:,} parameters, {report.steps} steps "
        f"({report.epochs:g} epochs), train loss {train_loss}{val}, {report.tokens_per_s:,.0f} tokens/s, "
        f"{report.wall_time_s:.0f} s" + (" (stopped early)" if report.stopped_early else "")
    )
    if report.kd_used:
        common.console.print(f"  logit KD: {report.kd_loss} KL, alpha {report.kd_alpha}, T {report.kd_temperature}")
    elif report.kd_reason:
        common.console.print(f"  no logit KD: {report.kd_reason}")
    if report.resumed_from:
        common.console.print(f"  resumed from {report.resumed_from}")
    common.console.print(f"  model folder: {out}")
