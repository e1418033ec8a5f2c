"""Distillation stage 2: train a student on the teacher's kept outputs, optionally with logit-level KD.

Supervised training with the loss on assistant tokens only, on the transformers ``Trainer``: the chat rows
are tokenized with the student's chat template (assistant tokens from its ``{% generation %}`` tags, or by
rendering the prompt prefix for templates without them), right-padded by :class:`ChatCollator`. With a
local teacher that shares the student's tokenizer, :class:`KDTrainer` adds the KL term of
:mod:`slmops.distill.kd` computed against the frozen teacher on the same batch::

    loss = (1 - kd_alpha) * CE + kd_alpha * T**2 * KD(teacher_T, student_T)

Compatibility (:mod:`slmops.distill.compat`) is checked from the tokenizer files and configs before any
weight is loaded. Validation loss (hard-label cross entropy on assistant tokens, comparable between KD and
non-KD runs) each epoch or every ``eval_every`` steps; early stopping restores the best checkpoint;
checkpoints go to ``<out>/checkpoints`` and ``resume=True`` continues from the last one. The same code runs
under ``accelerate launch`` (data parallel, any number of processes); only the main process writes the
final model and registers the artifact.

Usage::

    from slmops.distill.train import StudentTrainConfig, train_student

    cfg = StudentTrainConfig(student_preset="demo-student", teacher="runs/teacher", data="runs/synthetic")
    report = train_student(cfg, "runs/student", workspace=ws)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from slmops.config import StrictModel
from slmops.errors import BadInputError
from slmops.training.common import (  # noqa: F401 - re-exported: distillation's public training API
    CHECKPOINTS_DIR,
    IGNORE_INDEX,
    REPORT_FILE,
    ChatCollator,
    ProgressFn,
    backend,
    encode_chat,
    link_or_copy,
    prepare_checkpoints,
    progress_callbacks,
    register_folder,
    resolve_data_files,
    resolve_ref,
    tokenize_rows,
    unshare_files,
    world,
    write_report,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- config


class StudentTrainConfig(StrictModel):
    """Everything `slmops distill train` needs; unknown keys are rejected (recipes are validated whole)."""

    # models
    student: str | None = Field(None, description="Student model: artifact id/alias, local folder or hub id.")
    student_preset: str | None = Field(None, description="Create the student from this preset instead "
                                       "(with the teacher's tokenizer, or `tokenizer`).")
    tokenizer: str | None = Field(None, description="Tokenizer for a preset student when no teacher is given.")
    teacher: str | None = Field(None, description="Teacher for logit-level KD (local; same tokenizer as the student).")
    # data
    data: str = Field(description="Training chat data: a file, or a folder with train.jsonl (as `distill "
                      "generate` writes); a val.jsonl beside it is used for validation.")
    val_data: str | None = Field(None, description="Validation file; else val.jsonl beside the data, else a split.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Held out from `data` (by `seed`) when there is "
                                "no validation file; 0 = no validation.")
    max_length: int = Field(512, ge=8, description="Tokens per example; longer ones are truncated.")
    # schedule
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides `epochs`.")
    batch_size: int = Field(8, ge=1, description="Sequences per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(5e-4, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    bf16: bool = Field(False, description="bf16 mixed precision (for GPUs; slower on most CPUs).")
    threads: int | None = Field(None, ge=1, description="torch CPU threads.")
    # evaluation, checkpoints
    eval_every: int | None = Field(None, ge=1, description="Validate every N steps; default once per epoch.")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps; default at each validation "
                                   "(or once per epoch) and at the end.")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept (the best one is kept too).")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N validations without "
                                                "improvement; the best checkpoint becomes the final model.")
    resume: bool = Field(False, description="Continue from the last checkpoint in <out>/checkpoints.")
    logging_steps: int = Field(10, ge=1)
    # knowledge distillation
    kd_alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KD term (0 = sequence-level only).")
    kd_temperature: float = Field(2.0, gt=0)
    kd_loss: Literal["forward", "reverse", "jsd"] = "forward"
    allow_seq_level_fallback: bool = Field(False, description="With an incompatible teacher, train without "
                                           "logit KD instead of failing.")
    # registration
    name: str | None = Field(None, description="Name of the model artifact (default: the out folder's name).")

    @model_validator(mode="after")
    def _check(self) -> StudentTrainConfig:
        problems = []
        if (self.student is None) == (self.student_preset is None):
            problems.append("give exactly one of student (an existing model) or student_preset")
        if self.student_preset is not None and self.teacher is None and self.tokenizer is None:
            problems.append("student_preset needs a tokenizer: give teacher (its tokenizer is used) or tokenizer")
        if self.student is not None and self.tokenizer is not None:
            problems.append("tokenizer applies to student_preset only (an existing student brings its own)")
        if self.early_stopping_patience and self.val_data is None and self.val_fraction == 0:
            problems.append("early_stopping_patience needs validation data: set val_data or val_fraction > 0")
        if (self.early_stopping_patience and self.eval_every and self.save_every
                and self.save_every % self.eval_every):
            problems.append(f"with early stopping, save_every ({self.save_every}) must be a multiple of "
                            f"eval_every ({self.eval_every}) so that checkpoints fall on validations")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass
class TrainReport:
    """What a student training run did; stored as ``training.json`` and as the artifact's metrics."""

    out_dir: str
    steps: int
    epochs: float
    train_loss: float | None            # last logged training loss (the mixed loss with KD)
    val_loss: float | None              # hard-label CE on the validation set, final model
    best_val_loss: float | None
    train_rows: int
    val_rows: int
    dropped_rows: int                   # rows without assistant tokens left after truncation
    tokens_seen: int                    # non-padding input tokens, all processes
    tokens_per_s: float                 # over this session's training time
    train_time_s: float
    wall_time_s: float
    parameters: int
    kd_used: bool
    kd_reason: str | None               # why KD was not used (no teacher, alpha 0, incompatible + fallback)
    kd_alpha: float
    kd_temperature: float
    kd_loss: str
    stopped_early: bool
    resumed_from: str | None
    world_size: int
    backend: str | None                 # torch.distributed backend (gloo on CPUs, nccl on GPUs), None if single
    is_main_process: bool
    compat: dict[str, Any] | None = None
    artifact_id: str | None = None
    loss_history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- data


# ---------------------------------------------------------------------------------------------- trainer


@cache
def kd_trainer_class():
    """The `KDTrainer` class (built on first use so that importing this module does not import transformers).

    A transformers ``Trainer`` whose ``compute_loss`` mixes the student's cross entropy with the KD term
    against a frozen teacher run on the same batch. Evaluation returns the cross entropy only. The KD term
    is normalised like the cross entropy (by the assistant tokens of the whole accumulated batch, across
    processes), so gradient accumulation and data parallelism weight both terms alike. The averaged parts
    are logged as ``ce_loss`` and ``kd_loss``.
    """
    import torch
    from transformers import Trainer

    from slmops.distill.kd import kd_loss, mix_losses

    class KDTrainer(Trainer):
        def __init__(self, *args, teacher=None, kd_alpha: float = 0.5, kd_temperature: float = 2.0,
                     kd_kind: str = "forward", **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.kd_alpha = kd_alpha
            self.kd_temperature = kd_temperature
            self.kd_kind = kd_kind
            if teacher is not None:
                if self.args.n_gpu > 1:
                    raise BadInputError("logit KD does not run with torch DataParallel over several GPUs",
                                        "launch with `accelerate launch` (one process per GPU)")
                teacher.requires_grad_(False)
                teacher.eval()
                teacher.to(self.args.device)
            self._parts: dict[str, Any] = {}
            self._parts_last_step = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ce, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                               num_items_in_batch=num_items_in_batch)
            if self.teacher is None or not model.training:
                return (ce, outputs) if return_outputs else ce
            with torch.no_grad():
                t_logits = self.teacher(input_ids=inputs["input_ids"],
                                        attention_mask=inputs.get("attention_mask")).logits
            labels = inputs["labels"]
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                kd = kd_loss(outputs.logits, t_logits, labels, self.kd_temperature, self.kd_kind,
                             reduction="sum") / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    kd = kd * self.accelerator.num_processes  # as the Trainer scales the cross entropy
                step_share = 1.0
            else:
                kd = kd_loss(outputs.logits, t_logits, labels, self.kd_temperature, self.kd_kind)
                step_share = 1.0 / self.args.gradient_accumulation_steps
            loss = mix_losses(ce, kd, self.kd_alpha, self.kd_temperature)
            for key, value in (("ce_loss", ce), ("kd_loss", kd)):
                self._parts[key] = self._parts.get(key, 0.0) + value.detach() * step_share
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs and self._parts:
                steps = max(1, self.state.global_step - self._parts_last_step)
                for key, total in self._parts.items():
                    value = self.accelerator.gather(total.reshape(1)).mean().item() if torch.is_tensor(total) else total
                    logs[key] = round(value / steps, 6)
                self._parts = {}
                self._parts_last_step = self.state.global_step
            super().log(logs, start_time)

    return KDTrainer


# --------------------------------------------------------------------------------------------- training


def _register(workspace, out: Path, config: StudentTrainConfig, parents: list[str], report: TrainReport) -> str:
    """Register the model folder `out` (without checkpoints) as a `model` artifact; returns its id."""
    metrics = {k: v for k, v in report.to_dict().items() if k not in ("loss_history", "compat", "out_dir")}
    return register_folder(workspace, "model", config.name or out.name, out, config.model_dump(), parents, metrics)


def train_student(config: StudentTrainConfig | dict, out_dir: str | Path, *, workspace=None,
                  progress: ProgressFn | None = None, callbacks: list | None = None) -> TrainReport:
    """Train the student of `config` into `out_dir` and return a :class:`TrainReport`.

    `out_dir` receives the final model (Hugging Face layout: config, safetensors, tokenizer with chat
    template), ``training.json`` (the report) and ``checkpoints/``. With a `workspace`, model and data
    references may be artifact ids or aliases, and the final model is registered as a ``model`` artifact
    whose parents are the teacher, data and student artifacts (those that are registered).

    `progress(advance, status=..., total=...)` is called on the main process: once with ``total`` (the
    step count) at the start, then after every optimizer step with the loss and tokens/s. `callbacks`: extra
    transformers ``TrainerCallback`` objects.

    Raises ``BadInputError`` for an invalid config, unreadable data, or a teacher whose tokenizer or chat
    template does not match the student's when ``kd_alpha > 0`` (unless ``allow_seq_level_fallback``): all
    checked before any weight is loaded.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # weight loading/saving bars; training progress goes through `progress`
    try:
        return _train_student(config, out_dir, workspace=workspace, progress=progress, callbacks=callbacks)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _train_student(config: StudentTrainConfig | dict, out_dir: str | Path, *, workspace,
                   progress: ProgressFn | None, callbacks: list | None) -> TrainReport:
    t_start = time.time()
    if not isinstance(config, StudentTrainConfig):
        from pydantic import ValidationError

        from slmops.config import format_validation_error

        try:
            config = StudentTrainConfig.model_validate(config)
        except ValidationError as exc:
            raise BadInputError("invalid student training config:\n"
                                + format_validation_error(exc, "config")) from exc
    cfg = config
    out = Path(out_dir).expanduser().resolve()
    world_size, rank = world()

    import torch

    from slmops.data import load_dataset_file, split_indices
    from slmops.distill.compat import check_tokenizer_compat
    from slmops.models.load import load_tokenizer
    from slmops.models.presets import PRESETS, count_parameters

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.student_preset is not None and cfg.student_preset not in PRESETS:
        raise BadInputError(f"unknown student preset {cfg.student_preset!r}",
                            f"choose one of: {', '.join(sorted(PRESETS))}")

    # 1. references, tokenizers and the compatibility check (no weights yet)
    student_ref, student_art = resolve_ref(cfg.student, workspace)
    teacher_ref, teacher_art = resolve_ref(cfg.teacher, workspace)
    tokenizer_ref, tokenizer_art = resolve_ref(cfg.tokenizer, workspace)
    data_ref, data_art = resolve_ref(cfg.data, workspace)
    val_ref, val_art = resolve_ref(cfg.val_data, workspace)

    teacher_tok = load_tokenizer(teacher_ref) if teacher_ref else None
    if student_ref is not None:
        student_tok = load_tokenizer(student_ref)
    elif tokenizer_ref is not None:
        student_tok = load_tokenizer(tokenizer_ref)
    else:
        student_tok = load_tokenizer(teacher_ref)
    preset_vocab = len(student_tok) if cfg.student_preset else None

    kd_alpha, kd_reason, compat = cfg.kd_alpha, None, None
    if teacher_ref is None:
        kd_alpha, kd_reason = 0.0, "no teacher given: sequence-level training on the data only"
    else:
        compat = check_tokenizer_compat(student_tok if cfg.student_preset else student_ref, teacher_ref,
                                        student_model_vocab=preset_vocab)
        for note in compat.notes:
            log.info("tokenizer check: %s", note)
        if cfg.kd_alpha == 0:
            kd_reason = "kd_alpha is 0: sequence-level training on the teacher's outputs only"
        elif not compat.compatible:
            what = "; ".join(compat.problems)
            if not cfg.allow_seq_level_fallback:
                raise BadInputError(
                    f"teacher {cfg.teacher} and student {cfg.student or cfg.student_preset} cannot be used for "
                    f"logit-level KD: {what}",
                    "pass --allow-seq-level (allow_seq_level_fallback: true) to train on the teacher's outputs "
                    "without logit KD, or use a student with the teacher's tokenizer (e.g. --student-preset, "
                    "which creates the student with the teacher's tokenizer)",
                )
            log.warning("logit KD disabled (sequence-level only): %s", what)
            kd_alpha, kd_reason = 0.0, f"incompatible tokenizers, fell back to sequence-level: {what}"
    if not getattr(student_tok, "chat_template", None):
        if teacher_tok is not None and getattr(teacher_tok, "chat_template", None):
            student_tok.chat_template = teacher_tok.chat_template
            log.warning("the student tokenizer has no chat template: using the teacher's")
        else:
            raise BadInputError(f"the student tokenizer ({cfg.student or cfg.tokenizer}) has no chat template",
                                "use a tokenizer with a chat template (e.g. `slmops models train-tokenizer`)")
    pad_id = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id
    if pad_id is None:
        raise BadInputError("the student tokenizer has neither a pad nor an eos token")

    # 2. data
    train_file, folder_val = resolve_data_files(data_ref)
    val_file = Path(val_ref).expanduser() if val_ref else folder_val
    train_rows = load_dataset_file(train_file, purpose="train").records
    if val_file is not None:
        val_rows = load_dataset_file(val_file, purpose="train").records
    elif cfg.val_fraction > 0 and len(train_rows) > 1:
        split = split_indices([""] * len(train_rows), val=cfg.val_fraction, test=0.0, seed=cfg.seed)
        val_rows = [train_rows[i] for i in split["val"]]
        train_rows = [train_rows[i] for i in split["train"]]
    else:
        val_rows = []
    train_ds, dropped = tokenize_rows(student_tok, train_rows, cfg.max_length)
    val_ds, val_dropped = tokenize_rows(student_tok, val_rows, cfg.max_length)
    if not train_ds:
        raise BadInputError(f"no training example in {train_file} has assistant tokens within max_length "
                            f"{cfg.max_length}", "raise --max-length or check the data")
    if cfg.early_stopping_patience and not val_ds:
        raise BadInputError("early stopping needs validation examples, and there are none")

    # 3. schedule: evaluation and checkpoints on steps (an epoch = steps_per_epoch)
    # (a single process on several GPUs is torch DataParallel: its batch spans all of them)
    replicas = world_size if world_size > 1 or not torch.cuda.is_available() else max(1, torch.cuda.device_count())
    batches = math.ceil(math.ceil(len(train_ds) / replicas) / cfg.batch_size)
    steps_per_epoch = max(batches // cfg.grad_accum, 1)
    eval_steps = cfg.eval_every or steps_per_epoch
    save_steps = cfg.save_every or (eval_steps if val_ds else steps_per_epoch)
    if cfg.early_stopping_patience and save_steps % eval_steps:
        raise BadInputError(f"with early stopping, checkpoints every {save_steps} steps must fall on validations "
                            f"(every {eval_steps} steps)", "set save_every to a multiple of eval_every")

    ckpt_dir = out / CHECKPOINTS_DIR
    resume_from = prepare_checkpoints(ckpt_dir, cfg.resume, rank, log)

    # 4. models (weights load only now)
    from transformers import EarlyStoppingCallback, TrainingArguments

    from slmops.models.load import load_model

    if cfg.student_preset:
        from slmops.models.presets import create_model

        student = create_model(cfg.student_preset, vocab_size=len(student_tok), seed=cfg.seed)
        for c in (student.config, student.generation_config):
            c.eos_token_id = student_tok.eos_token_id
            c.pad_token_id = pad_id
            c.bos_token_id = student_tok.bos_token_id
    else:
        student = load_model(student_ref, dtype="float32")
    student.train()
    teacher = load_model(teacher_ref) if (teacher_ref and kd_alpha > 0) else None

    use_cpu = not torch.cuda.is_available()
    has_val = bool(val_ds)
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        eval_strategy="steps" if has_val else "no",
        eval_steps=eval_steps if has_val else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=bool(cfg.early_stopping_patience),
        metric_for_best_model="eval_loss" if cfg.early_stopping_patience else None,
        greater_is_better=False if cfg.early_stopping_patience else None,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to=[],
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        log_level="passive",
    )
    stats: dict[str, Any] = {}
    cbs = progress_callbacks(progress, stats) + list(callbacks or [])
    early = None
    if cfg.early_stopping_patience:
        early = EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)
        cbs.append(early)
    trainer = kd_trainer_class()(
        model=student, args=args, train_dataset=train_ds, eval_dataset=val_ds or None,
        data_collator=ChatCollator(pad_id), processing_class=student_tok, callbacks=cbs,
        teacher=teacher, kd_alpha=kd_alpha, kd_temperature=cfg.kd_temperature, kd_kind=cfg.kd_loss,
    )

    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes through `progress`, not printed dicts

    # 5. train; the validation loss of the final model (the best one with early stopping)
    output = trainer.train(resume_from_checkpoint=resume_from)
    state = trainer.state

    def evals() -> list[tuple[int, float]]:
        return [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h]

    val_loss = None
    if has_val:
        if args.load_best_model_at_end and state.best_metric is not None:
            val_loss = float(state.best_metric)
        elif evals() and evals()[-1][0] == state.global_step:
            val_loss = float(evals()[-1][1])
        else:
            val_loss = float(trainer.evaluate()["eval_loss"])
    session_tokens = state.num_input_tokens_seen - stats.get("tokens0", 0)
    train_time = float(output.metrics.get("train_runtime", time.time() - stats.get("t0", t_start)))
    stopped_early = bool(early and early.early_stopping_patience_counter >= cfg.early_stopping_patience
                         and state.global_step < state.max_steps)
    final_model = trainer.accelerator.unwrap_model(trainer.model)
    report = TrainReport(
        out_dir=str(out),
        steps=state.global_step,
        epochs=round(float(state.epoch or 0.0), 4),
        train_loss=stats.get("loss"),
        val_loss=val_loss,
        best_val_loss=min((v for _, v in evals()), default=None),
        train_rows=len(train_ds),
        val_rows=len(val_ds),
        dropped_rows=dropped + val_dropped,
        tokens_seen=int(state.num_input_tokens_seen),
        tokens_per_s=round(session_tokens / max(train_time, 1e-9), 1),
        train_time_s=round(train_time, 2),
        wall_time_s=0.0,
        parameters=count_parameters(final_model),
        kd_used=kd_alpha > 0,
        kd_reason=kd_reason,
        kd_alpha=kd_alpha,
        kd_temperature=cfg.kd_temperature,
        kd_loss=cfg.kd_loss,
        stopped_early=stopped_early,
        resumed_from=str(resume_from) if resume_from else None,
        world_size=world_size,
        backend=backend(),
        is_main_process=trainer.is_world_process_zero(),
        compat=compat.to_dict() if compat else None,
        loss_history=stats.get("history", []),
    )

    # 6. the main process writes the model folder and registers it
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        from slmops.models.create import write_model_folder

        out.mkdir(parents=True, exist_ok=True)
        unshare_files(out)
        final_model.eval()
        write_model_folder(final_model, student_tok, out)
        report.wall_time_s = round(time.time() - t_start, 2)
        write_report(out, report)
        if workspace is not None:
            parents = list(dict.fromkeys(a for a in (teacher_art, data_art, val_art, student_art, tokenizer_art)
                                         if a))
            report.artifact_id = _register(workspace, out, cfg, parents, report)
            write_report(out, report)  # a new file: the registered copy (a hard link) keeps its content
    else:
        report.wall_time_s = round(time.time() - t_start, 2)
    trainer.accelerator.wait_for_everyone()
    return report


__all__ = [
    "ChatCollator",
    "StudentTrainConfig",
    "TrainReport",
    "encode_chat",
    "kd_trainer_class",
    "resolve_data_files",
    "tokenize_rows",
    "train_student",
]
