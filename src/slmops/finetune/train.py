"""Fine-tuning: full, LoRA or QLoRA on the transformers ``Trainer`` with PEFT (and bitsandbytes for 4-bit).

The data (any format of the data layer) is rendered with the model's chat template and labelled on the
assistant/completion tokens only (``train_on_inputs`` labels every token); optional packing. Validation
(given, or split off), evaluation every N steps, early stopping, best-checkpoint keep, checkpoints and
resume, gradient accumulation and checkpointing, warm-up and schedule, a custom loss from the user's
module, TensorBoard logs in ``<out>/runs``. The same code runs under ``accelerate launch`` (data parallel;
FSDP/DeepSpeed configs pass through accelerate); only the main process writes and registers.

Outputs in ``out_dir``: for LoRA/QLoRA a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
with the tokenizer, registered as an ``adapter`` artifact whose parent is the base model; for full
fine-tuning a Hugging Face model folder registered as a ``model``. Plus ``training.json`` and ``checkpoints/``.

Usage::

    from slmops.finetune import FinetuneConfig, run_finetune

    report = run_finetune(FinetuneConfig(model="runs/student", data="ft/train.jsonl", method="lora"), "runs/ft")
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError
from slmops.finetune.config import FinetuneConfig
from slmops.training.common import (
    CHECKPOINTS_DIR,
    ChatCollator,
    ProgressFn,
    backend,
    pack_rows,
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
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see finetune/lora.py
RUNS_DIR = "runs"


@dataclass
class FinetuneReport:
    """What a fine-tuning run did; stored as ``training.json`` and as the artifact's metrics."""

    out_dir: str
    method: str
    base_model: str
    steps: int
    epochs: float
    train_loss: float | None
    val_loss: float | None              # validation loss of the result (the best checkpoint with keep_best)
    best_val_loss: float | None
    best_step: int | None
    train_rows: int
    val_rows: int
    packed_rows: int | None             # training rows after packing (None without packing)
    dropped_rows: int                   # rows without a labelled token left after truncation
    tokens_seen: int
    tokens_per_s: float                 # non-padding tokens / training time without validation and checkpoints
    train_time_s: float                 # trainer.train() wall time (validation and checkpoints included)
    eval_save_time_s: float             # of which validating and checkpointing
    wall_time_s: float
    parameters: int                     # all parameters of the trained model (base + adapter)
    trainable_parameters: int
    trainable_share: float
    quantized_layers: int               # 4-bit layers (QLoRA)
    peak_rss_mb: float | None           # this process's peak resident memory (VmHWM; ru_maxrss off Linux)
    lr: float
    stopped_early: bool
    resumed_from: str | None
    world_size: int
    backend: str | None
    is_main_process: bool
    custom_loss: str | None = None
    artifact_id: str | None = None
    loss_history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- pieces


def load_loss_function(spec: str) -> Callable:
    """The user's loss `module:function` (or `path/to/file.py:function`)."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise BadInputError(f"custom loss {spec!r} is not `module:function`", "e.g. --loss my_pkg.losses:focal")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise BadInputError(f"custom loss file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(f"slmops_user_loss_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # the user's own package in the working folder
            module = importlib.import_module(target)
    except ImportError as exc:
        raise BadInputError(f"cannot import the custom loss module {target!r}: {exc}",
                            "make it importable (pip install -e, PYTHONPATH) or pass a .py file path") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise BadInputError(f"{target} has no function {name!r}", "the loss is fn(outputs, labels, "
                            "num_items_in_batch) -> scalar tensor")
    return fn


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (VmHWM), to 0.1 MB."""
    from slmops.evaluate.isolated import vm_hwm_mb

    return round(vm_hwm_mb(), 1)


def load_rows(cfg: FinetuneConfig, data_ref: str, val_ref: str | None) -> tuple[list[dict], list[dict], Path]:
    """(training rows, validation rows, training file) as chat messages, in any format of the data layer."""
    from slmops.data import load_dataset_file, split_indices

    train_file, folder_val = resolve_data_files(data_ref)
    val_file = Path(val_ref).expanduser() if val_ref else folder_val

    def load(path: Path) -> list[dict]:
        return load_dataset_file(path, cfg.format, cfg.template, cfg.completion_field, purpose="train").records

    train_rows = load(train_file)
    if val_file is not None:
        val_rows = load(val_file)
    elif cfg.val_fraction > 0 and len(train_rows) > 1:
        split = split_indices([""] * len(train_rows), val=cfg.val_fraction, test=0.0, seed=cfg.seed)
        val_rows = [train_rows[i] for i in split["val"]]
        train_rows = [train_rows[i] for i in split["train"]]
    else:
        val_rows = []
    return train_rows, val_rows, train_file


def _load_base(cfg: FinetuneConfig, model_ref: str):
    """The model to train: the base itself (full), or the base wrapped in a PEFT LoRA (on a 4-bit base)."""
    import torch

    from slmops.finetune.lora import fix_cpu_4bit, lora_config, quantization_config
    from slmops.models.load import load_model

    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = load_model(model_ref, dtype="float32", quantization_config=quantization_config(model_ref))
        if not torch.cuda.is_available():
            fix_cpu_4bit(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        model = load_model(model_ref, dtype="bfloat16" if (cfg.bf16 and cfg.method == "full") else "float32")
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(cfg.lora, getattr(model.config, "model_type", None)))


def _register(workspace, out: Path, cfg: FinetuneConfig, parents: list[str], report: FinetuneReport) -> str:
    metrics = {k: v for k, v in report.to_dict().items() if k not in ("loss_history", "out_dir")}
    return register_folder(workspace, "adapter" if cfg.uses_adapter else "model", cfg.name or out.name, out,
                           cfg.model_dump(), parents, metrics)


def _save(model, tokenizer, out: Path, cfg: FinetuneConfig, base_ref: str) -> None:
    """Write the adapter (PEFT layout) or the full model (HF layout) with the tokenizer into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    unshare_files(out)
    for stale in ("adapter_model.safetensors", "adapter_config.json", "model.safetensors"):
        (out / stale).unlink(missing_ok=True)
    model.eval()
    if cfg.uses_adapter:
        model.save_pretrained(str(out))
        # the adapter's base is recorded as given (a local folder path stays loadable offline)
        import json

        acfg_path = out / "adapter_config.json"
        acfg = json.loads(acfg_path.read_text())
        acfg["base_model_name_or_path"] = base_ref
        acfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(str(out))
    else:
        from slmops.models.create import write_model_folder

        write_model_folder(model, tokenizer, out)


# ------------------------------------------------------------------------------------------- training


def run_finetune(config: FinetuneConfig | dict, out_dir: str | Path, *, workspace=None,
                 progress: ProgressFn | None = None, callbacks: list | None = None) -> FinetuneReport:
    """Fine-tune per `config` into `out_dir` and return a :class:`FinetuneReport`.

    With a `workspace`, the model and data may be artifact ids or aliases, and the result is registered
    (an ``adapter`` for LoRA/QLoRA, a ``model`` for full) with the base model and data as parents.
    `progress(advance, status=..., total=...)` is called on the main process after every optimizer step
    (loss, validation loss, tokens/s). `callbacks`: extra transformers ``TrainerCallback`` objects (the
    tuner uses this for pruning).

    Raises ``BadInputError`` for an invalid config, unreadable data or QLoRA where 4-bit training cannot
    run, all before any weight is loaded.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run(config, out_dir, workspace=workspace, progress=progress, callbacks=callbacks)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def validate_config(config: FinetuneConfig | dict) -> FinetuneConfig:
    if isinstance(config, FinetuneConfig):
        return config
    from pydantic import ValidationError

    from slmops.config import format_validation_error

    try:
        return FinetuneConfig.model_validate(config)
    except ValidationError as exc:
        raise BadInputError("invalid fine-tuning config:\n" + format_validation_error(exc, "config")) from exc


def _run(config: FinetuneConfig | dict, out_dir: str | Path, *, workspace, progress: ProgressFn | None,
         callbacks: list | None) -> FinetuneReport:
    t_start = time.time()
    cfg = validate_config(config)
    out = Path(out_dir).expanduser().resolve()
    world_size, rank = world()

    import torch

    from slmops.models.load import load_tokenizer
    from slmops.models.presets import count_parameters

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loss_fn = load_loss_function(cfg.loss) if cfg.loss else None
    if cfg.method == "qlora":
        from slmops.finetune.lora import check_qlora_available

        check_qlora_available()

    # 1. references, tokenizer and data (no weights yet)
    model_ref, model_art = resolve_ref(cfg.model, workspace)
    data_ref, data_art = resolve_ref(cfg.data, workspace)
    val_ref, val_art = resolve_ref(cfg.val_data, workspace)
    tokenizer = load_tokenizer(model_ref)
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError(f"the model's tokenizer ({cfg.model}) has no chat template to render the data with",
                            "add one (slmops models create writes ChatML), or fine-tune a chat/instruct model")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise BadInputError("the tokenizer has neither a pad nor an eos token")
    train_rows, val_rows, train_file = load_rows(cfg, data_ref, val_ref)
    train_ds, dropped = tokenize_rows(tokenizer, train_rows, cfg.max_length, cfg.train_on_inputs)
    val_ds, val_dropped = tokenize_rows(tokenizer, val_rows, cfg.max_length, cfg.train_on_inputs)
    if not train_ds:
        raise BadInputError(f"no training example in {train_file} has a labelled token within max_length "
                            f"{cfg.max_length}", "raise --max-length or check the data")
    if cfg.early_stopping_patience and not val_ds:
        raise BadInputError("early stopping needs validation examples, and there are none")
    unpacked_rows = len(train_ds)
    if cfg.packing:
        train_ds = pack_rows(train_ds, cfg.max_length)

    # 2. schedule on steps
    replicas = world_size if world_size > 1 or not torch.cuda.is_available() else max(1, torch.cuda.device_count())
    batches = math.ceil(math.ceil(len(train_ds) / replicas) / cfg.batch_size)
    steps_per_epoch = max(batches // cfg.grad_accum, 1)
    eval_steps = cfg.eval_every or steps_per_epoch
    save_steps = cfg.save_every or (eval_steps if val_ds else steps_per_epoch)
    keep_best = bool(val_ds) and (cfg.keep_best or bool(cfg.early_stopping_patience))
    if keep_best and save_steps % eval_steps:
        raise BadInputError(f"keeping the best checkpoint needs checkpoints on validations: save_every "
                            f"{save_steps} is not a multiple of eval_every {eval_steps}",
                            "set save_every to a multiple of eval_every, or keep_best: false")

    ckpt_dir = out / CHECKPOINTS_DIR
    resume_from = prepare_checkpoints(ckpt_dir, cfg.resume, rank, log)

    # 3. the model (weights load only now)
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments, set_seed

    from slmops.finetune.lora import count_4bit_layers

    set_seed(cfg.seed)  # the LoRA initialisation is random: the same seed gives the same adapter
    model = _load_base(cfg, model_ref)
    model.train()
    tb_callbacks = []
    if cfg.tensorboard and rank == 0:
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            tb_callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(str(out / RUNS_DIR))))
        else:
            log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
    has_val = bool(val_ds)
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        learning_rate=cfg.learning_rate,
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
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False if keep_best else None,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to=[],
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16 and cfg.method != "full",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        log_level="passive",
    )
    stats: dict[str, Any] = {}
    cbs = progress_callbacks(progress, stats) + tb_callbacks + list(callbacks or [])
    early = None
    if cfg.early_stopping_patience:
        early = EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)
        cbs.append(early)
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds or None,
        data_collator=ChatCollator(pad_id), processing_class=tokenizer, callbacks=cbs,
        compute_loss_func=loss_fn,
    )
    trainer.remove_callback(PrinterCallback)
    # time spent validating and checkpointing inside train(), so tokens/s measures the training steps only
    overhead = {"s": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                overhead["s"] += time.perf_counter() - t0
        return wrapper

    trainer.evaluate = timed(trainer.evaluate)
    trainer._save_checkpoint = timed(trainer._save_checkpoint)

    # 4. train; the validation loss of the result
    output = trainer.train(resume_from_checkpoint=resume_from)
    state = trainer.state
    evals = [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h]
    val_loss, best_step = None, None
    if has_val:
        if keep_best and state.best_metric is not None:
            val_loss = float(state.best_metric)
            if state.best_model_checkpoint:
                best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])
        elif evals and evals[-1][0] == state.global_step:
            val_loss, best_step = float(evals[-1][1]), state.global_step
        else:
            val_loss, best_step = float(trainer.evaluate()["eval_loss"]), state.global_step
    session_tokens = state.num_input_tokens_seen - stats.get("tokens0", 0)
    train_time = float(output.metrics.get("train_runtime", time.time() - stats.get("t0", t_start)))
    step_time = max(train_time - overhead["s"], 1e-9)
    stopped_early = bool(early and early.early_stopping_patience_counter >= cfg.early_stopping_patience
                         and state.global_step < state.max_steps)
    final = trainer.accelerator.unwrap_model(trainer.model)
    total = count_parameters(final)
    trainable = sum(p.numel() for p in final.parameters() if p.requires_grad)
    report = FinetuneReport(
        out_dir=str(out), method=cfg.method, base_model=cfg.model, steps=state.global_step,
        epochs=round(float(state.epoch or 0.0), 4), train_loss=stats.get("loss"), val_loss=val_loss,
        best_val_loss=min((v for _, v in evals), default=None), best_step=best_step,
        train_rows=unpacked_rows, val_rows=len(val_ds), packed_rows=len(train_ds) if cfg.packing else None,
        dropped_rows=dropped + val_dropped, tokens_seen=int(state.num_input_tokens_seen),
        tokens_per_s=round(session_tokens / step_time, 1), train_time_s=round(train_time, 2),
        eval_save_time_s=round(overhead["s"], 2),
        wall_time_s=0.0, parameters=total, trainable_parameters=trainable,
        trainable_share=round(trainable / max(total, 1), 6), quantized_layers=count_4bit_layers(final),
        peak_rss_mb=peak_rss_mb(), lr=cfg.learning_rate, stopped_early=stopped_early,
        resumed_from=str(resume_from) if resume_from else None, world_size=world_size, backend=backend(),
        is_main_process=trainer.is_world_process_zero(), custom_loss=cfg.loss,
        loss_history=stats.get("history", []),
    )

    # 5. the main process writes the result and registers it
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        _save(final, tokenizer, out, cfg, model_ref)
        report.wall_time_s = round(time.time() - t_start, 2)
        write_report(out, report)
        if workspace is not None:
            parents = list(dict.fromkeys(a for a in (model_art, data_art, val_art) if a))
            report.artifact_id = _register(workspace, out, cfg, parents, report)
            write_report(out, report)
    else:
        report.wall_time_s = round(time.time() - t_start, 2)
    trainer.accelerator.wait_for_everyone()
    return report


__all__ = ["FinetuneReport", "load_loss_function", "load_rows", "peak_rss_mb", "run_finetune", "validate_config"]
