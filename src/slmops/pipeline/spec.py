"""The pipeline YAML: its top-level shape, the step kinds, their inputs and their options.

A pipeline file::

    name: quickstart                 # state lives in <workspace>/pipelines/<name>/
    vars: {seed: 0, steps: 1200}     # ${vars.NAME} anywhere in inputs/options (overridable: --set vars.steps=20)
    steps:
      - name: distill
        kind: distill
        inputs: {data: "${steps.generate.output}", teacher: "${steps.teacher.output}"}
        options: {student_preset: demo-student, max_steps: "${vars.steps}"}

Options of the kinds that have a command are that command's own pydantic config (`finetune`:
:class:`~slmops.finetune.config.FinetuneConfig`, `distill`: :class:`~slmops.distill.train.StudentTrainConfig`,
`tune`: :class:`~slmops.finetune.tune.TuneConfig`), with the fields that name models or data moved to
``inputs``; the other kinds have a :class:`~slmops.config.StrictModel` of their own below. Unknown keys
are errors everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from slmops.config import StrictModel

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class StepSpec(StrictModel):
    """One step: `kind` says what it does, `inputs` what it reads, `options` how."""

    name: str = Field(pattern=NAME_RE, description="Unique step name (letters, digits, - and _).")
    kind: str = Field(description="What the step does: see `slmops run --help` / docs/pipeline.md.")
    inputs: dict[str, Any] = Field(default_factory=dict, description="Input name -> a file or folder "
                                   "(relative to the pipeline file), an artifact id/alias, or an earlier step's "
                                   "output: ${steps.NAME.output} (its artifact) or ${steps.NAME.output}/FILE.")
    options: dict[str, Any] = Field(default_factory=dict, description="The kind's options.")
    after: list[str] = Field(default_factory=list, description="Steps that must finish first without "
                             "passing an output (ordering only).")


class PipelineSpec(StrictModel):
    """A whole pipeline file."""

    name: str = Field(pattern=NAME_RE, description="Pipeline name: its state is <workspace>/pipelines/<name>/.")
    description: str | None = None
    vars: dict[str, Any] = Field(default_factory=dict, description="Values for ${vars.NAME} (override with "
                                 "--set vars.NAME=VALUE).")
    steps: list[StepSpec] = Field(min_length=1)


# --- options of the kinds without a command config --------------------------------------------------------


DEMO_TASKS = ("triage", "gifts", "subscriptions")
_TRIAGE_SIZES = ("train", "val", "test", "prompts", "gold")
_EXTENSION_SIZES = ("train", "val", "test", "test_base")


class DemoDataOptions(StrictModel):
    """`demo-data`: the bundled demo task's data (`slmops demo data` / `slmops demo finetune-data`)."""

    task: Literal["triage", "gifts", "subscriptions"] = Field(
        "triage", description="triage: the base task (train/val/test/prompts/gold); gifts, subscriptions: "
        "a fine-tuning set of new intents (train/val/test/test_base) with base-task replay.")
    seed: int = 0
    hard: bool = Field(False, description="The hard variant (distracting orders and products).")
    sizes: dict[str, int] | None = Field(None, description="Rows per file, e.g. {train: 200, prompts: 64} "
                                         "(default: the demo's sizes).")
    replay: float = Field(0.25, ge=0, lt=1, description="Share of base-task rows in train/val (extension tasks).")
    name: str | None = Field(None, description="Dataset artifact name (default: demo-triage-seed<seed> / "
                             "demo-<task>).")

    @model_validator(mode="after")
    def _check(self) -> DemoDataOptions:
        allowed = _TRIAGE_SIZES if self.task == "triage" else _EXTENSION_SIZES
        bad = [k for k in (self.sizes or {}) if k not in allowed]
        if bad:
            raise ValueError(f"sizes for task {self.task} are {', '.join(allowed)}; unknown: {', '.join(bad)}")
        if any(v < 0 for v in (self.sizes or {}).values()):
            raise ValueError("sizes must be >= 0")
        return self


class ImportOptions(StrictModel):
    """`import`: register a folder (input `path`) or the bundled demo teacher as an artifact."""

    bundled: Literal["demo-teacher"] | None = Field(None, description="demo-teacher: the teacher shipped "
                                                    "with slmops (instead of the input `path`).")
    artifact_kind: Literal["model", "dataset", "adapter"] = Field("model", description="Kind of the artifact.")
    name: str | None = Field(None, description="Artifact name (default: the folder's name).")
    alias: str | None = Field(None, description="Also point this registry alias at it.")


class FilterOptions(StrictModel):
    """The filters of `slmops distill generate` (slmops.distill.FilterConfig)."""

    json_valid: bool = False
    json_schema: str | None = Field(None, description="JSON schema file answers must match.")
    regex: str | None = None
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=0)
    refusals: bool = True
    drop_truncated: bool = True
    dedup: bool = True
    near_dup_threshold: float | None = Field(None, gt=0, le=1)
    min_agreement: float | None = Field(None, gt=0, le=1)


class GenerateOptions(StrictModel):
    """`generate`: the teacher labels prompts (`slmops distill generate`); resumable."""

    system_prompt: str | None = None
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    num_samples: int = Field(1, ge=1)
    seed: int = 0
    stop: list[str] | None = None
    batch_size: int = Field(16, ge=1, description="Requests per batch for local teachers.")
    concurrency: int = Field(8, ge=1, description="Requests in flight (URL teachers).")
    min_success: float = Field(0.9, ge=0, le=1)
    limit: int | None = Field(None, ge=1, description="Label only the first N prompts.")
    filters: FilterOptions = Field(default_factory=FilterOptions)
    name: str | None = Field(None, description="Dataset artifact name (default: <pipeline>-<step>).")


class ExportOptions(StrictModel):
    """`export`: ONNX (onnxruntime-genai) or GGUF (llama.cpp), as `slmops export onnx|gguf`."""

    format: Literal["onnx", "gguf"]
    precision: Literal["fp32", "fp16", "int8", "int4"] = Field("int4", description="onnx only.")
    quant: str = Field("q4_k_m", description="gguf only: f16, q8_0, q4_k_m, ...")
    adapter_mode: Literal["merge", "runtime", "lora"] = Field("merge", description="merge bakes the adapter in; "
                                                              "runtime (onnx) / lora (gguf) keep it separate.")
    int4_block_size: int = Field(32, ge=16)
    int4_symmetric: bool = True
    int4_accuracy_level: int = Field(4, ge=0, le=4)
    execution_provider: str = "cpu"
    token_embedding_type: str | None = Field(None, description="gguf only.")
    pad_ffn: bool = Field(True, description="gguf only.")
    modelfile: bool = Field(True, description="gguf only: write an Ollama Modelfile beside the file.")
    eval_limit: int = Field(100, ge=1, description="Records of the input `eval_data` used for parity.")
    max_new_tokens: int = Field(96, ge=1)
    max_ppl_increase: float | None = Field(None, gt=0, description="Gate (exit 3) on parity.")
    min_task_retention: float | None = Field(None, gt=0, le=1, description="Gate (exit 3) on parity.")
    name: str | None = Field(None, description="Export artifact name (default: <pipeline>-<step>).")

    @model_validator(mode="after")
    def _check(self) -> ExportOptions:
        if self.format == "onnx" and self.adapter_mode == "lora":
            raise ValueError("adapter_mode lora is for gguf; onnx takes merge or runtime")
        if self.format == "gguf" and self.adapter_mode == "runtime":
            raise ValueError("adapter_mode runtime is for onnx; gguf takes merge or lora")
        return self


class EvalOptions(StrictModel):
    """`eval`: task metrics with bootstrap intervals on a data file (`slmops eval`)."""

    metrics: list[str] | None = Field(None, description="Default: those the data supports.")
    limit: int | None = Field(None, ge=1, description="Only the first N records.")
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(16, ge=1)
    label_field: str | None = None
    resamples: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    record: bool = Field(True, description="Also merge the scores into the model's manifest (metrics.eval).")
    data_name: str | None = Field(None, description="The name the data goes by in the manifest (metrics.eval.NAME) "
                                  "and the report (default: the file's stem; set it when two files share a stem).")
    name: str | None = Field(None, description="Eval artifact name (default: <pipeline>-<step>).")


class BenchOptions(StrictModel):
    """`bench`: latency, throughput, memory (`slmops bench`)."""

    prompt_tokens: list[int] = Field(default_factory=lambda: [32, 128, 512])
    max_new_tokens: int = Field(64, ge=2)
    repeats: int = Field(5, ge=1)
    warmup: int = Field(2, ge=0)
    concurrency: list[int] = Field(default_factory=list)
    ignore_eos: bool = True
    memory: bool = True
    threads: int | None = Field(None, ge=1)
    seed: int = 0
    name: str | None = Field(None, description="Bench artifact name (default: <pipeline>-<step>).")


class GateOptions(StrictModel):
    """`gate`: checks over an eval step's scores; a failure stops the pipeline (exit 3)."""

    checks: list[str] = Field(min_length=1, description='Expressions like "exact_match>=0.9" (>=, >, <=, <, ==; '
                              'a trailing % divides by 100).')
    record: bool = Field(True, description="Record the result in the evaluated model's manifest "
                         "(metrics.gates), which promotion requires.")

    @field_validator("checks", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("checks")
    @classmethod
    def _parse(cls, v: list[str]) -> list[str]:
        from slmops.errors import BadInputError
        from slmops.evaluate.gates import parse_gate

        bad = []
        for expr in v:
            try:
                parse_gate(expr)
            except BadInputError as exc:
                bad.append(exc.message)
        if bad:
            raise ValueError("; ".join(bad))
        return v


class PromoteOptions(StrictModel):
    """`promote`: point a registry alias at the input artifact, only when its recorded gates passed."""

    to: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$", description="The alias: candidate, staging, "
                    "production, or any name.")
    reason: str | None = Field(None, description="Logged with the registry event.")
    force: bool = Field(False, description="Promote even without passed gates (needs a reason).")

    @model_validator(mode="after")
    def _check(self) -> PromoteOptions:
        if self.force and not self.reason:
            raise ValueError("force needs a reason (it is logged)")
        return self


class BundleOptions(StrictModel):
    """`bundle`: a versioned device bundle per blueprint profile (`slmops bundle`, slmops.rollout)."""

    version: str = Field(description="Bundle version, e.g. v2 (bundles are immutable per version).")
    profiles: list[str] | None = Field(None, description="Only these profiles (default: all).")
    name: str | None = Field(None, description="Bundle artifact name (default: <pipeline>-<step>).")


# --- kinds -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """An input of a step kind. `type`: file (an existing file), path (an existing file or folder), ref (an
    artifact id, alias or path; http(s) URLs too where `url` is set), step (only ${steps.NAME.output})."""

    type: Literal["file", "path", "ref", "step"]
    required: bool = False
    help: str = ""
    url: bool = False


@dataclass(frozen=True)
class KindSpec:
    """A step kind: its inputs and options. With `config_inputs`, the options model is the command's own
    config and the inputs fill its fields of the same name."""

    name: str
    help: str
    inputs: dict[str, InputSpec]
    options: type[StrictModel] | None = None
    config_inputs: bool = False
    forbidden_options: tuple[str, ...] = ()
    deterministic: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _kinds() -> dict[str, KindSpec]:
    ref_model = InputSpec("ref", True, "the model: artifact id/alias, folder, or ${steps.NAME.output}")
    kinds = [
        KindSpec("demo-data", "write the bundled demo task's data and register it as a dataset", {},
                 DemoDataOptions, deterministic="yes"),
        KindSpec("import", "register a folder (or the bundled demo teacher) as an artifact",
                 {"path": InputSpec("path", False, "the folder to register")}, ImportOptions,
                 deterministic="yes (the same files give the same artifact)"),
        KindSpec("generate", "the teacher labels prompts; the kept answers become a dataset",
                 {"teacher": InputSpec("ref", True, "teacher model, or an OpenAI-compatible URL", url=True),
                  "prompts": InputSpec("file", True, "prompt file (JSONL/JSON/CSV/Parquet)")},
                 GenerateOptions, deterministic="train.jsonl yes (greedy); generations.jsonl holds timings"),
        KindSpec("distill", "train a student on the teacher's answers (slmops distill train)",
                 {"data": InputSpec("ref", True, "training chat data: dataset, folder or file"),
                  "teacher": InputSpec("ref", False, "teacher for logit KD (and the preset student's tokenizer)"),
                  "student": InputSpec("ref", False, "an existing student model"),
                  "tokenizer": InputSpec("ref", False, "tokenizer for a preset student"),
                  "val_data": InputSpec("ref", False, "validation data")},
                 None, config_inputs=True, forbidden_options=("resume",),
                 deterministic="weights yes (fixed seed, CPU); training.json holds timings"),
        KindSpec("finetune", "full / LoRA / QLoRA fine-tuning (slmops finetune)",
                 {"model": ref_model, "data": InputSpec("ref", True, "training data: dataset, folder or file"),
                  "val_data": InputSpec("ref", False, "validation data"),
                  "recipe": InputSpec("file", False, "a recipe YAML (e.g. a tune step's best.yaml); the "
                                      "step's options override its keys")},
                 None, config_inputs=True, forbidden_options=("resume",),
                 deterministic="weights yes (fixed seed, CPU); training.json holds timings"),
        KindSpec("tune", "hyperparameter search over a fine-tuning recipe (slmops tune)",
                 {"model": ref_model, "data": InputSpec("ref", True, "training data"),
                  "val_data": InputSpec("ref", False, "validation data")},
                 None, config_inputs=True, deterministic="no (timings); best.yaml yes for a seeded sampler"),
        KindSpec("export", "export to ONNX or GGUF (slmops export onnx|gguf)",
                 {"model": ref_model, "adapter": InputSpec("ref", False, "a LoRA adapter to merge or attach"),
                  "eval_data": InputSpec("file", False, "chat records for parity against the source")},
                 ExportOptions, deterministic="model files yes; export.json holds timings"),
        KindSpec("eval", "evaluate a model on a data file (slmops eval)",
                 {"model": ref_model, "data": InputSpec("file", True, "evaluation data file"),
                  "baseline": InputSpec("ref", False, "a baseline model evaluated beside it"),
                  "reference": InputSpec("ref", False, "a reference model for agreement metrics")},
                 EvalOptions, deterministic="answers and scores yes (greedy); eval.json holds timings"),
        KindSpec("bench", "latency, throughput and memory (slmops bench)",
                 {"model": ref_model, "baseline": InputSpec("ref", False, "a second model, side by side")},
                 BenchOptions, deterministic="no (timings)", extra={"model_inputs": True}),
        KindSpec("gate", "quality gates over an eval step's scores; failing stops the pipeline (exit 3)",
                 {"eval": InputSpec("step", True, "${steps.NAME.output} of an eval step")},
                 GateOptions, deterministic="yes"),
        KindSpec("promote", "point a registry alias at an artifact whose gates passed",
                 {"artifact": InputSpec("ref", True, "the artifact: usually ${steps.GATE.output}")},
                 PromoteOptions, deterministic="yes"),
        KindSpec("bundle", "device bundles per blueprint profile (slmops bundle)",
                 {"blueprint": InputSpec("file", True, "blueprint YAML: device profiles -> variant and smoke test")},
                 BundleOptions, deterministic="model and smoke files yes; bundle.json holds its creation time",
                 extra={"profile_inputs": True}),
    ]
    return {k.name: k for k in kinds}


KINDS: dict[str, KindSpec] = _kinds()


def config_model(kind: str) -> type[StrictModel]:
    """The options model of a kind (the command's own config for distill/finetune/tune)."""
    spec = KINDS[kind]
    if spec.options is not None:
        return spec.options
    if kind == "distill":
        from slmops.distill.train import StudentTrainConfig

        return StudentTrainConfig
    if kind == "finetune":
        from slmops.finetune.config import FinetuneConfig

        return FinetuneConfig
    from slmops.finetune.tune import TuneConfig

    return TuneConfig


REF_RE = re.compile(r"\$\{steps\.([^}.]+)\.output\}")
VAR_RE = re.compile(r"\$\{vars\.([^}]+)\}")
ANY_REF_RE = re.compile(r"\$\{([^}]*)\}")
