"""`slmops finetune`: full, LoRA or QLoRA fine-tuning of a model on any data format."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from slmops.cli import common
from slmops.cli.app import app
from slmops.errors import BadInputError


def resolved_config(config_file: Path | None, flags: dict[str, Any], lora_flags: dict[str, Any]):
    """The recipe (if any) with the flags that were given laid over it, validated as a whole."""
    from pydantic import ValidationError

    from slmops.config import format_validation_error, load_yaml_config
    from slmops.finetune.config import FinetuneConfig

    base: dict[str, Any] = {}
    if config_file is not None:
        base = load_yaml_config(config_file, FinetuneConfig).model_dump(exclude_unset=True)
    given = {k: v for k, v in flags.items() if v is not None}
    lora = {**base.get("lora", {}), **{k: v for k, v in lora_flags.items() if v is not None}}
    merged = {**base, **given}
    if lora:
        merged["lora"] = lora
    try:
        return FinetuneConfig.model_validate(merged)
    except ValidationError as exc:
        source = f"{config_file} + command line" if config_file else "command line"
        raise BadInputError("invalid options:\n" + format_validation_error(exc, source),
                            "see `slmops finetune --help`") from exc


@app.command("finetune")
def finetune(
    out: Annotated[Path, typer.Option(help="Output folder: the adapter (lora/qlora) or model (full), training.json, checkpoints/, runs/ (TensorBoard).")],
    model: Annotated[str | None, typer.Option(help="Base model: artifact id/alias, local folder or hub id.")] = None,
    data: Annotated[str | None, typer.Option(help="Training data: a file in any supported format (chat, prompt-completion, input-output, template) or a folder with train.jsonl (val.jsonl beside it validates).")] = None,
    method: Annotated[str | None, typer.Option(help="full (every weight), lora, or qlora (4-bit NF4 base + LoRA) (default: lora).")] = None,
    val_data: Annotated[str | None, typer.Option(help="Validation data file (default: val.jsonl beside --data, else --val-fraction).")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Fraction of --data held out for validation when no validation file (default: 0.05).")] = None,
    format: Annotated[str | None, typer.Option("--format", help="Data format: chat, prompt-completion, input-output or template (default: detected).")] = None,
    template: Annotated[str | None, typer.Option(help="Prompt template over record fields, e.g. 'Classify: {text}' (template format).")] = None,
    completion_field: Annotated[str | None, typer.Option(help="Record field with the answer (template format) (default: output).")] = None,
    train_on_inputs: Annotated[bool | None, typer.Option("--train-on-inputs/--no-train-on-inputs", help="Loss on every token, not only assistant/completion tokens.")] = None,
    packing: Annotated[bool | None, typer.Option("--packing/--no-packing", help="Pack several examples into each --max-length row.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per example; longer ones are truncated (default: 512).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs over the data (default: 1).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per device per micro-batch (default: 8).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step (default: 1).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 5e-5 full, 2e-4 lora/qlora).")] = None,
    warmup_ratio: Annotated[float | None, typer.Option(help="Warm-up share of the steps (default: 0.03).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (default: 0).")] = None,
    lr_scheduler: Annotated[str | None, typer.Option(help="cosine, linear, constant or constant_with_warmup (default: cosine).")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward: less memory, ~30% slower.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the split, data order and LoRA init (default: 0).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Validate every N steps (default: once per epoch).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (default: at each validation).")] = None,
    save_total_limit: Annotated[int | None, typer.Option(help="Checkpoints kept (default: 2).")] = None,
    early_stopping_patience: Annotated[int | None, typer.Option(help="Stop after N validations without improvement.")] = None,
    keep_best: Annotated[bool | None, typer.Option("--keep-best/--keep-last", help="Result = the checkpoint with the lowest validation loss, or the last step (default: keep-best).")] = None,
    resume: Annotated[bool | None, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint in OUT/checkpoints.")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (default: 16).")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha; the update is scaled by alpha/r (default: 32).")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="LoRA dropout (default: 0.05).")] = None,
    target_modules: Annotated[str | None, typer.Option(help="Comma-separated module names, or all-linear (default: the architecture's attention + MLP projections).")] = None,
    modules_to_save: Annotated[str | None, typer.Option(help="Comma-separated modules trained fully and saved with the adapter (e.g. embed_tokens,lm_head).")] = None,
    dora: Annotated[bool | None, typer.Option("--dora/--no-dora", help="Weight-decomposed LoRA (DoRA).")] = None,
    loss: Annotated[str | None, typer.Option(help="Custom loss `module:function` or `file.py:function`, called as fn(outputs, labels, num_items_in_batch).")] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", help="TensorBoard logs in OUT/runs (default: on).")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 (GPUs; slower on most CPUs).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    logging_steps: Annotated[int | None, typer.Option(help="Log the loss every N steps (default: 10).")] = None,
    name: Annotated[str | None, typer.Option(help="Name to register the result under (default: OUT's folder name).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Recipe YAML with these options (snake_case keys, `lora:` block); flags override it.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and the memory estimate; loads no weights.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the training report as JSON.")] = False,
) -> None:
    """Fine-tune a model: full, LoRA, or QLoRA (4-bit base + LoRA) on chat, prompt/completion, input/output or templated data.

    The data is rendered with the model's chat template; the loss is on the answer tokens only unless --train-on-inputs. LoRA/QLoRA write a PEFT adapter (adapter_config.json + safetensors) registered with the base model as its parent; full writes a model folder. Runs unchanged under `accelerate launch` (DDP; FSDP/DeepSpeed config files pass through).

    Examples:\n
      slmops finetune --model runs/student --data ft/train.jsonl --method lora --out runs/ft-lora\n
      slmops finetune --model M --data qa.csv --template 'Q: {question}' --completion-field answer --out runs/qa\n
      slmops finetune --config examples/recipes/demo-student-lora.yaml --out runs/ft --dry-run\n
      accelerate launch --num_processes 2 -m slmops finetune --config recipe.yaml --out runs/ft
    """
    flags = dict(
        model=model, data=data, method=method, val_data=val_data, val_fraction=val_fraction, format=format,
        template=template, completion_field=completion_field, train_on_inputs=train_on_inputs, packing=packing,
        max_length=max_length, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        lr=lr, warmup_ratio=warmup_ratio, weight_decay=weight_decay, lr_scheduler=lr_scheduler,
        gradient_checkpointing=gradient_checkpointing, seed=seed, eval_every=eval_every, save_every=save_every,
        save_total_limit=save_total_limit, early_stopping_patience=early_stopping_patience, keep_best=keep_best,
        resume=resume, loss=loss, tensorboard=tensorboard, bf16=bf16, threads=threads,
        logging_steps=logging_steps, name=name,
    )
    lora_flags = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=target_modules,
                      modules_to_save=modules_to_save.split(",") if modules_to_save else None, use_dora=dora)
    cfg = resolved_config(config, flags, lora_flags)
    if dry_run:
        import yaml

        from slmops.finetune.memory import estimate_memory

        typer.echo(f"# slmops finetune --out {out}  (dry run: no weights loaded)")
        typer.echo(yaml.safe_dump(cfg.model_dump(), sort_keys=False).rstrip())
        est = estimate_memory(cfg)
        parts = ", ".join(f"{k} {v:,.0f} MB" for k, v in est["parts_mb"].items())
        typer.echo(f"# memory estimate: ~{est['total_mb']:,.0f} MB ({parts}); {est['trainable_parameters']:,} of "
                   f"{est['parameters']:,} parameters trainable; {est['note']}")
        if cfg.method == "qlora":
            from slmops.finetune.lora import qlora_unavailable_reason

            reason = qlora_unavailable_reason()
            typer.echo(f"# qlora: {'available' if reason is None else 'NOT available here: ' + reason}")
        return

    from slmops.finetune.train import run_finetune

    main = os.environ.get("RANK", "0") == "0"
    ws = common.get_workspace()
    if main and not common.STATE.quiet:
        with common.progress(f"fine-tuning ({cfg.method})", total=None) as advance:
            report = run_finetune(cfg, out, workspace=ws, progress=advance)
    else:
        report = run_finetune(cfg, out, workspace=ws)
    if not main:
        return
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    val = f", val loss {report.val_loss:.4f} (step {report.best_step})" if report.val_loss is not None else ""
    train_loss = f"{report.train_loss:.4f}" if report.train_loss is not None else "-"
    kind = "adapter" if cfg.uses_adapter else "model"
    common.console.print(
        f"{kind} [bold]{report.artifact_id or out}[/] ({cfg.method}): {report.trainable_parameters:,} of "
        f"{report.parameters:,} parameters trained, {report.steps} steps ({report.epochs:g} epochs), train loss "
        f"{train_loss}{val}, {report.tokens_per_s:,.0f} tokens/s, {report.wall_time_s:.0f} s"
        + (" (stopped early)" if report.stopped_early else "")
    )
    if report.resumed_from:
        common.console.print(f"  resumed from {report.resumed_from}")
    common.console.print(f"  {kind} folder: {out}" + (f"  ·  TensorBoard: tensorboard --logdir {out}/runs"
                                                       if cfg.tensorboard else ""))
