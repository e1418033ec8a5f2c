"""The fine-tuning recipe: one pydantic model for `slmops finetune` flags, `--config` YAML and `slmops tune`.

Unknown keys are rejected with the key named (recipes are validated whole, with file and line for YAML).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from slmops.config import StrictModel

Method = Literal["full", "lora", "qlora"]

# Peak learning rates used when the recipe gives none: adapters train a few new weights from zero and
# take larger steps than a full update of pretrained weights.
DEFAULT_LR = {"full": 5e-5, "lora": 2e-4, "qlora": 2e-4}


class LoraSettings(StrictModel):
    """LoRA (and QLoRA) adapter settings, passed to ``peft.LoraConfig``."""

    r: int = Field(16, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module names to adapt; `all-linear` for every linear layer but the output head; "
        "default: attention and MLP projections of the architecture (all-linear when unknown).")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained fully and saved with the adapter (e.g. embed_tokens, lm_head).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str) and v != "all-linear":
            return [m.strip() for m in v.split(",") if m.strip()]
        return v


class FinetuneConfig(StrictModel):
    """Everything `slmops finetune` needs. See `slmops finetune --help` for the same options as flags."""

    # model and method
    model: str = Field(description="Base model: artifact id/alias, local folder or hub id.")
    method: Method = Field("lora", description="full (every weight), lora, or qlora (4-bit NF4 base + LoRA).")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    # data
    data: str = Field(description="Training data file (any format of the data layer) or a folder with "
                      "train.jsonl; a val.jsonl beside it validates.")
    val_data: str | None = Field(None, description="Validation file; else val.jsonl beside the data, else a split.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Held out from `data` (by `seed`) when there is "
                                "no validation file; 0 = no validation.")
    format: Literal["chat", "prompt-completion", "input-output", "template"] | None = Field(
        None, description="Data format; detected from the records when omitted.")
    template: str | None = Field(None, description="Prompt template over record fields, e.g. "
                                 "'Classify: {text}' (with completion_field).")
    completion_field: str | None = Field(None, description="The record field holding the answer (with template).")
    train_on_inputs: bool = Field(False, description="Loss on every token, not only the assistant/completion.")
    packing: bool = Field(False, description="Pack several examples into each max_length row.")
    max_length: int = Field(512, ge=8, description="Tokens per example (or packed row); longer ones are truncated.")
    # schedule
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides `epochs`.")
    batch_size: int = Field(8, ge=1, description="Sequences per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; default 5e-5 for full, 2e-4 for "
                             "lora/qlora.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory, "
                                         "~30% slower).")
    seed: int = 0
    bf16: bool = Field(False, description="bf16 mixed precision (GPUs; slower on most CPUs).")
    threads: int | None = Field(None, ge=1, description="torch CPU threads.")
    # evaluation, checkpoints, logs
    eval_every: int | None = Field(None, ge=1, description="Validate every N steps; default once per epoch.")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps; default at each "
                                   "validation (or once per epoch).")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept (the best one is kept too).")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N validations without "
                                                "improvement; the best checkpoint becomes the result.")
    keep_best: bool = Field(True, description="With validation, the result is the checkpoint with the lowest "
                            "validation loss (not the last step).")
    resume: bool = Field(False, description="Continue from the last checkpoint in <out>/checkpoints.")
    logging_steps: int = Field(10, ge=1)
    tensorboard: bool = Field(True, description="Write TensorBoard logs to <out>/runs.")
    loss: str | None = Field(None, description="Custom loss `module:function` (or `path/to/file.py:function`) "
                             "called as fn(outputs, labels, num_items_in_batch) -> loss tensor.")
    # registration
    name: str | None = Field(None, description="Name of the artifact (default: the out folder's name).")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        problems = []
        if self.early_stopping_patience and self.val_data is None and self.val_fraction == 0:
            problems.append("early_stopping_patience needs validation data: set val_data or val_fraction > 0")
        if (self.early_stopping_patience and self.eval_every and self.save_every
                and self.save_every % self.eval_every):
            problems.append(f"with early stopping, save_every ({self.save_every}) must be a multiple of "
                            f"eval_every ({self.eval_every})")
        if self.template is not None and self.format not in (None, "template"):
            problems.append(f"template applies to the template format, not {self.format!r}")
        if self.loss is not None and ":" not in self.loss:
            problems.append(f"loss {self.loss!r} must be `module:function` (e.g. my_pkg.losses:focal)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("lora", "qlora")


__all__ = ["DEFAULT_LR", "FinetuneConfig", "LoraSettings", "Method"]
