"""Hyperparameter search over a fine-tuning recipe (`slmops tune --config HPO.yaml`), on Optuna.

An HPO file names a fine-tuning recipe (inline under ``recipe:`` or as ``recipe_file:``), a search space
over the recipe's fields (dotted paths for nested ones: ``lr``, ``lora.r``, ``lora.dropout``...), an
objective (``val_loss``, minimised, from the training report; or a task metric ``exact_match``,
``json_valid`` or ``field_accuracy``, maximised, from greedy answers on the validation data), a sampler
(TPE or random) and a pruner (median pruning on the validation losses reported at every evaluation).

Each trial is a plain :func:`~slmops.finetune.train.run_finetune` into ``<out>/trials/<number>/``. The study
lives in SQLite (``<out>/study.db`` by default), so running again with the same output folder resumes it:
finished trials are kept and new ones are added until ``n_trials`` trials have finished. Outputs:
``trials.csv`` and ``trials.md`` (one row per trial), ``best.yaml`` (the best trial's complete recipe, for
``slmops finetune --config best.yaml``), ``summary.json``. The best trial keeps its weights; the other
trials keep only ``training.json`` and ``config.yaml``.

Usage::

    from slmops.finetune.tune import load_tune_config, run_tune

    result = run_tune(load_tune_config("hpo.yaml"), "runs/hpo")
    print(result.best_value, result.best_params)
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from slmops.config import StrictModel
from slmops.errors import BadInputError
from slmops.finetune.config import FinetuneConfig

log = logging.getLogger(__name__)

TASK_METRICS = ("exact_match", "json_valid", "field_accuracy")
OBJECTIVES = ("val_loss", *TASK_METRICS)
TRIALS_DIR = "trials"
STUDY_FILE = "study.db"
DEFAULT_STUDY_NAME = "tune"
# files of a trial folder that hold weights (removed from every trial but the best one)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# fields the search space may not touch: trials always start fresh and write their own folder
_NOT_SEARCHABLE = ("resume",)
# values Optuna stores as categorical choices as they are; others (lists, dicts) go in as JSON text
_PRIMITIVE = (type(None), bool, int, float, str)

ProgressFn = Callable[..., None]


# ------------------------------------------------------------------------------------------------ config


def _field_at(path: str) -> tuple[Any, str | None]:
    """(the pydantic FieldInfo at dotted `path` of FinetuneConfig, None) or (None, why not)."""
    model: type[BaseModel] = FinetuneConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        where = ".".join(parts[:i]) or "the recipe"
        if info is None:
            known = ", ".join(sorted(model.model_fields))
            return None, f"{path!r} is not a fine-tuning recipe field ({where} has: {known})"
        sub = _model_type(info.annotation)
        if i < len(parts) - 1:
            if sub is None:
                return None, f"{'.'.join(parts[:i + 1])!r} has no sub-fields (in {path!r})"
            model = sub
        elif sub is not None:
            known = ", ".join(f"{path}.{k}" for k in sorted(sub.model_fields))
            return None, f"{path!r} is a group of settings; search one of its fields ({known})"
    if path in _NOT_SEARCHABLE:
        return None, f"{path!r} cannot be searched (every trial starts fresh)"
    return info, None


def _model_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _scalar_types(annotation: Any) -> set[type]:
    """The plain types a field accepts (Optional and unions flattened; Literal -> its values' types)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return {type(v) for v in get_args(annotation)}
    if origin is not None and get_args(annotation):
        out: set[type] = set()
        for a in get_args(annotation):
            out |= _scalar_types(a)
        return out if origin not in (list, dict, tuple, set) else {origin}
    return {annotation} if isinstance(annotation, type) else set()


def _check_path(path: str) -> str:
    _, why = _field_at(path)
    if why:
        raise ValueError(why)
    return path


SearchPath = Annotated[str, AfterValidator(_check_path)]


class ParamSpec(StrictModel):
    """One searched recipe field: a range (``float``, ``int``, ``log``) or a list of ``choice`` values."""

    type: Literal["float", "int", "log", "choice"] = Field(
        description="float / int: uniform in [low, high] (on a log scale with `log: true`); log: a float on a "
        "log scale; choice: one of `values`.")
    low: float | None = Field(None, description="Lower bound (float, int, log).")
    high: float | None = Field(None, description="Upper bound, included (float, int, log).")
    step: float | None = Field(None, gt=0, description="Grid step from `low` (float, int); not with a log scale.")
    log: bool = Field(False, description="Sample on a log scale (float, int).")
    values: list[Any] | None = Field(None, description="The choices (choice).")

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        problems = []
        if self.type == "choice":
            if not self.values:
                problems.append("a choice needs a non-empty `values` list")
            extra = [k for k in ("low", "high", "step") if getattr(self, k) is not None] + (["log"] if self.log else [])
            if extra:
                problems.append(f"a choice takes `values` only, not {', '.join(extra)}")
        else:
            if self.values is not None:
                problems.append(f"`values` is for type choice; a {self.type} range takes low and high")
            if self.low is None or self.high is None:
                problems.append(f"a {self.type} range needs both low and high")
            elif not self.low < self.high:
                problems.append(f"low ({self.low:g}) must be below high ({self.high:g})")
            elif self.is_log and self.low <= 0:
                problems.append(f"a log scale needs low > 0 (got {self.low:g})")
            if self.step is not None and self.is_log:
                problems.append("step cannot be combined with a log scale")
            if self.type == "int":
                for k in ("low", "high", "step"):
                    v = getattr(self, k)
                    if v is not None and v != int(v):
                        problems.append(f"an int range needs whole numbers: {k} is {v:g}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_log(self) -> bool:
        return self.type == "log" or self.log

    def describe(self) -> str:
        if self.type == "choice":
            return "one of " + ", ".join(json.dumps(v) for v in self.values or [])
        kind = "int" if self.type == "int" else "float"
        scale = ", log scale" if self.is_log else ""
        step = f", step {self.step:g}" if self.step is not None else ""
        return f"{kind} in [{self.low:g}, {self.high:g}]{scale}{step}"


class TuneConfig(StrictModel):
    """An HPO file: the recipe, what to search, what to optimise, and how."""

    recipe: FinetuneConfig | None = Field(None, description="The fine-tuning recipe (the keys of `slmops "
                                          "finetune --config`); the searched fields are set per trial.")
    recipe_file: str | None = Field(None, description="A recipe YAML instead of `recipe` (relative to the "
                                    "HPO file).")
    search_space: dict[SearchPath, ParamSpec] = Field(
        description="Recipe field (dotted for nested: lr, lora.r, lora.alpha, lora.dropout, batch_size, "
        "max_steps...) -> {type: float|int|log|choice, low, high, step, log, values}.")
    objective: Literal["val_loss", "exact_match", "json_valid", "field_accuracy"] = Field(
        "val_loss", description="val_loss (minimised; the report's validation loss) or a task metric "
        "(maximised; greedy answers on the validation data).")
    eval_limit: int = Field(200, ge=1, description="Validation records answered per trial for a task metric.")
    eval_max_new_tokens: int = Field(96, ge=1, description="Tokens generated per answer for a task metric.")
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: int | None = Field(None, ge=0, description="TPE: random trials before the model kicks in "
                                       "[default: n_trials // 4, between 3 and 10].")
    pruner: Literal["median", "none"] = Field("median", description="median: stop a trial whose validation "
                                              "loss is worse than the median of earlier trials at the same step.")
    pruner_startup_trials: int = Field(3, ge=0, description="Trials finished before pruning starts.")
    pruner_warmup_steps: int = Field(0, ge=0, description="Steps of each trial before it may be pruned.")
    n_trials: int = Field(20, ge=1, description="Finished (complete or pruned) trials in the study, in total.")
    timeout_s: float | None = Field(None, gt=0, description="No new trial starts after this many seconds.")
    seed: int = Field(0, description="Seed of the sampler (trials train with the recipe's own seed).")
    study_name: str = Field(DEFAULT_STUDY_NAME, min_length=1)
    storage: str | None = Field(None, description="Optuna storage URL or SQLite file [default: <out>/study.db].")

    @field_validator("search_space")
    @classmethod
    def _check_space(cls, space: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not space:
            raise ValueError("empty: name at least one recipe field to search")
        problems = []
        for path, spec in space.items():
            info, _ = _field_at(path)
            kinds = _scalar_types(info.annotation) - {type(None)}
            if spec.type == "choice":
                continue
            if not kinds & {int, float}:
                problems.append(f"{path}: the field takes {_type_names(kinds)}; search it with type: choice")
            elif spec.type in ("float", "log") and float not in kinds:
                problems.append(f"{path}: the field is an integer; use type: int")
        if problems:
            raise ValueError("; ".join(problems))
        return space

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        if (self.recipe is None) == (self.recipe_file is None):
            raise ValueError("give the fine-tuning recipe either inline (`recipe:`) or as `recipe_file:`, "
                             "exactly one of them")
        return self

    @property
    def direction(self) -> str:
        return "minimize" if self.objective == "val_loss" else "maximize"

    def resolved_recipe(self, base_dir: str | Path | None = None) -> FinetuneConfig:
        """The recipe: inline, or read from `recipe_file` (relative to `base_dir`, default the working folder)."""
        if self.recipe is not None:
            return self.recipe
        from slmops.config import load_yaml_config

        path = Path(self.recipe_file).expanduser()  # type: ignore[arg-type]
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return load_yaml_config(path, FinetuneConfig)


def _type_names(kinds: set[type]) -> str:
    names = sorted(getattr(k, "__name__", str(k)) for k in kinds)
    return " or ".join(names) or "a value"


def load_tune_config(path: str | Path) -> TuneConfig:
    """Read an HPO YAML (every problem reported with its line); `recipe_file` becomes relative to it, and the
    recipe and search space are checked together (see :func:`check_search_space`)."""
    from slmops.config import load_yaml_config

    path = Path(path).expanduser()
    cfg = load_yaml_config(path, TuneConfig)
    if cfg.recipe_file is not None and not Path(cfg.recipe_file).expanduser().is_absolute():
        cfg.recipe_file = str((path.parent / Path(cfg.recipe_file).expanduser()).resolve())
    check_search_space(cfg, source=str(path))
    return cfg


def _set_path(data: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        if not isinstance(data.get(p), dict):
            data[p] = {}
        data = data[p]
    data[leaf] = value


def trial_config(recipe: FinetuneConfig, params: dict[str, Any]) -> FinetuneConfig:
    """The recipe with the searched `params` (dotted paths) set, validated; never resumes."""
    data = recipe.model_dump()
    for path, value in params.items():
        _set_path(data, path, value)
    data["resume"] = False
    return FinetuneConfig.model_validate(data)


def check_search_space(config: TuneConfig, recipe: FinetuneConfig | None = None, source: str = "HPO config",
                       ) -> FinetuneConfig:
    """Check that every end of every range (and every choice) makes a valid recipe; return the recipe.

    Raises ``BadInputError`` naming each bad parameter, before anything is loaded."""
    from pydantic import ValidationError

    if recipe is None:
        recipe = config.resolved_recipe()
    problems = []
    for path, spec in config.search_space.items():
        probes = spec.values if spec.type == "choice" else [spec.low, spec.high]
        for value in probes or []:
            if spec.type == "int":
                value = int(value)
            try:
                trial_config(recipe, {path: value})
            except ValidationError as exc:
                why = "; ".join(e["msg"] for e in exc.errors())
                problems.append(f"{source}: search_space.{path}: the value {value!r} makes an invalid recipe: {why}")
    if problems:
        raise BadInputError("invalid search space:\n" + "\n".join(problems),
                            "keep every range inside what the recipe field accepts")
    return recipe


# ------------------------------------------------------------------------------------------------ result


@dataclass
class TuneResult:
    """What a search did; ``summary.json`` holds the same."""

    out_dir: str
    study_name: str
    storage: str
    objective: str
    direction: str
    n_trials: int                                   # finished trials (complete + pruned) in the study
    n_complete: int
    n_pruned: int
    n_failed: int
    new_trials: int                                 # trials started by this call
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any] | None
    best_dir: str | None                            # the best trial's folder (with its weights)
    best_config_file: str | None                    # best.yaml
    wall_time_s: float
    search_space: dict[str, str] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -------------------------------------------------------------------------------------------- optuna bits


def _optuna():
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - optuna is a dependency
        raise BadInputError("hyperparameter search needs optuna, which is not installed",
                            "pip install optuna") from exc
    return optuna


def _storage_url(config: TuneConfig, out: Path) -> str:
    if config.storage is None:
        return f"sqlite:///{out / STUDY_FILE}"
    if "://" in config.storage:
        return config.storage
    return f"sqlite:///{Path(config.storage).expanduser().resolve()}"


def _sampler(config: TuneConfig, n_trials: int, seed: int):
    optuna = _optuna()
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = config.startup_trials if config.startup_trials is not None else min(10, max(3, n_trials // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def _pruner(config: TuneConfig):
    optuna = _optuna()
    if config.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=config.pruner_startup_trials,
                                       n_warmup_steps=config.pruner_warmup_steps)


def _encode(value: Any) -> Any:
    return value if isinstance(value, _PRIMITIVE) else json.dumps(value)


def suggest(trial, path: str, spec: ParamSpec) -> Any:
    """Ask `trial` for a value of `path` per `spec` (choices that are lists or dicts come back decoded)."""
    if spec.type == "choice":
        values = list(spec.values or [])
        encoded = [_encode(v) for v in values]
        picked = trial.suggest_categorical(path, encoded)
        return values[encoded.index(picked)]
    if spec.type == "int":
        return trial.suggest_int(path, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.is_log)
    return trial.suggest_float(path, float(spec.low), float(spec.high), step=spec.step, log=spec.is_log)


def _decoded_params(trial, config: TuneConfig) -> dict[str, Any]:
    out = {}
    for path, value in trial.params.items():
        spec = config.search_space.get(path)
        if spec is not None and spec.type == "choice":
            encoded = [_encode(v) for v in spec.values or []]
            value = spec.values[encoded.index(value)] if value in encoded else value
        out[path] = value
    return out


def _pruning_callback(trial, sign: float):
    """A TrainerCallback reporting every validation loss to `trial` (times `sign`) and stopping the training
    once the pruner says so."""
    from transformers import TrainerCallback

    class PruningCallback(TrainerCallback):
        def __init__(self) -> None:
            self.pruned_at: int | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not state.is_world_process_zero or not metrics or "eval_loss" not in metrics:
                return
            if self.pruned_at is not None:
                return
            trial.report(sign * float(metrics["eval_loss"]), state.global_step)
            if trial.should_prune():
                self.pruned_at = state.global_step
                control.should_training_stop = True

    return PruningCallback()


# --------------------------------------------------------------------------------------------- evaluation


def _validation_records(cfg: FinetuneConfig, workspace) -> list[dict]:
    """The validation records `run_finetune` validates on for `cfg` (a file, val.jsonl beside the data, or
    the seeded split)."""
    from slmops.finetune.train import load_rows
    from slmops.training.common import resolve_ref

    data_ref, _ = resolve_ref(cfg.data, workspace)
    val_ref, _ = resolve_ref(cfg.val_data, workspace)
    _, val_rows, _ = load_rows(cfg, data_ref, val_ref)
    return val_rows


def task_scores(cfg: FinetuneConfig, trial_dir: Path, records: list[dict], *, base_ref: str,
                max_new_tokens: int = 96) -> dict[str, float]:
    """Greedy answers of the fine-tuned model in `trial_dir` on `records`, scored (exact_match, ...).

    An adapter is merged into its base (float32; for QLoRA the NF4-rounded base it trained with, so the
    score is the trained model's) before answering."""
    import torch

    from slmops.engines.torch_engine import TorchEngine
    from slmops.evaluate.runner import evaluate_engine
    from slmops.models.load import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(str(trial_dir))
    if cfg.uses_adapter:
        from peft import PeftModel

        if cfg.method == "qlora":
            from slmops.finetune.lora import load_nf4_rounded

            base = load_nf4_rounded(base_ref)
        else:
            base = load_model(base_ref, dtype="float32", device=device)
        model = PeftModel.from_pretrained(base, str(trial_dir)).merge_and_unload()
    else:
        model = load_model(str(trial_dir), dtype="float32", device=device)
    engine = TorchEngine(model=model, tokenizer=tokenizer, device=device)
    try:
        return evaluate_engine(engine, records, max_new_tokens=max_new_tokens).scores
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------- the search


def _remove_weights(trial_dir: Path) -> None:
    """Keep a trial's reports; drop its checkpoints, weights and TensorBoard-free leftovers."""
    if not trial_dir.is_dir():
        return
    shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)
    for p in trial_dir.iterdir():
        if p.is_file() and p.suffix in _WEIGHT_SUFFIXES:
            p.unlink()


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _trial_rows(study, config: TuneConfig) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        seconds = a.get("seconds")
        if seconds is None and t.datetime_start and t.datetime_complete:
            seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
        rows.append({
            "number": t.number, "state": t.state.name.lower(), "params": _decoded_params(t, config),
            # (Optuna keeps a pruned trial's last intermediate value as its value: not an objective value)
            "objective": t.value if t.state.name == "COMPLETE" else None,
            "val_loss": a.get("val_loss"), "steps": a.get("steps"), "seconds": seconds,
            "pruned_at": a.get("pruned_at"), "scores": a.get("scores"), "error": a.get("error"),
        })
    return rows


def _write_tables(out: Path, rows: list[dict[str, Any]], config: TuneConfig, best: int | None) -> None:
    paths = list(config.search_space)
    extra = [] if config.objective == "val_loss" else ["val_loss"]
    header = ["number", "state", *paths, config.objective, *extra, "steps", "seconds", "pruned_at"]

    def cell(v: Any) -> Any:
        return "" if v is None else json.dumps(v) if isinstance(v, list | dict) else v

    tmp = out / ".trials.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            vals = [cell(r["params"].get(p)) for p in paths] + [cell(r["objective"])]
            vals += [cell(r["val_loss"]) for _ in extra]
            w.writerow([r["number"], r["state"], *vals, cell(r["steps"]), cell(r["seconds"]), cell(r["pruned_at"])])
    tmp.replace(out / "trials.csv")

    lines = [f"# Hyperparameter search `{config.study_name}`", "",
             f"Objective: {config.objective} ({'lower' if config.direction == 'minimize' else 'higher'} is "
             f"better); {len(rows)} trials" + (f"; best: trial {best}" if best is not None else "; no "
                                                "completed trial yet") + ".", "",
             "| trial | state | " + " | ".join(paths) + f" | {config.objective} | steps | seconds |",
             "|---|---|" + "---|" * len(paths) + "---|---|---|"]
    for r in rows:
        mark = " **best**" if r["number"] == best else ""
        state = r["state"] + (f" at step {r['pruned_at']}" if r["state"] == "pruned" and r["pruned_at"] else "")
        params = [format_value(r["params"][p]) if p in r["params"] else "" for p in paths]
        obj = "" if r["objective"] is None else format_value(float(r["objective"]))
        cells = [f"{r['number']}{mark}", state, *params, obj, format_value(r["steps"]) if r["steps"] is not None else "",
                 format_value(r["seconds"]) if r["seconds"] is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "trials.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_best(out: Path, cfg: FinetuneConfig, trial_number: int, value: float, config: TuneConfig) -> Path:
    import yaml

    data = cfg.model_dump()
    data["lr"] = cfg.learning_rate  # the default made explicit
    data["resume"] = False
    head = (f"# The best trial ({trial_number}) of study `{config.study_name}`: {config.objective} {value:.6g}.\n"
            f"# Its weights: {out / TRIALS_DIR / str(trial_number)}\n"
            f"# Train it again (or longer): slmops finetune --config {out / 'best.yaml'} --out DIR\n")
    path = out / "best.yaml"
    tmp = out / ".best.yaml.tmp"
    tmp.write_text(head + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


def run_tune(config: TuneConfig | dict, out_dir: str | Path, *, workspace=None, n_trials: int | None = None,
             timeout_s: float | None = None, progress: ProgressFn | None = None, verbose: bool = False,
             pruner=None, base_dir: str | Path | None = None) -> TuneResult:
    """Search the recipe's hyperparameters per `config`; outputs in `out_dir` (see the module docstring).

    `n_trials` / `timeout_s` override the config's. With a `workspace`, the recipe's model and data may be
    artifact ids or aliases (the trials are not registered; ``slmops finetune --config best.yaml`` trains and
    registers the winner). `progress(advance, status=..., total=...)` is called once per finished trial and
    with a status while a trial trains. `verbose` keeps Optuna's per-trial log lines. `pruner`: an Optuna
    pruner object used instead of the config's (advanced use and tests). `base_dir`: what a relative
    `recipe_file` is relative to (default: the working folder; :func:`load_tune_config` makes it absolute).

    Raises ``BadInputError`` for an invalid config, a search space outside the recipe's valid values, or a
    study in the output folder that optimises another objective; all before any weight is loaded.
    """
    optuna = _optuna()
    from pydantic import ValidationError

    from slmops.config import format_validation_error
    from slmops.finetune.train import run_finetune
    from slmops.training.common import resolve_ref

    t_start = time.time()
    if not isinstance(config, TuneConfig):
        try:
            config = TuneConfig.model_validate(config)
        except ValidationError as exc:
            raise BadInputError("invalid HPO config:\n" + format_validation_error(exc, "config")) from exc
    recipe = check_search_space(config, config.resolved_recipe(base_dir))
    n_total = n_trials if n_trials is not None else config.n_trials
    timeout = timeout_s if timeout_s is not None else config.timeout_s
    if n_total < 1:
        raise BadInputError(f"n_trials must be at least 1 (got {n_total})")
    searched = set(config.search_space)

    # the data and validation set, checked before any weight loads
    val_needed = not (searched & {"data", "val_data", "val_fraction", "seed", "format", "template",
                                  "completion_field"})
    fixed_val = _validation_records(recipe, workspace) if val_needed else None
    if fixed_val is not None and not fixed_val:
        raise BadInputError(f"the objective {config.objective} needs validation data, and the recipe has none",
                            "set val_data, put a val.jsonl beside the data, or set val_fraction > 0")
    if (config.pruner == "median" and pruner is None and recipe.eval_every is None
            and "eval_every" not in searched):
        log.warning("pruning sees one validation per epoch: set eval_every in the recipe to prune earlier")
    model_ref, _ = resolve_ref(recipe.model, workspace)

    out = Path(out_dir).expanduser().resolve()
    (out / TRIALS_DIR).mkdir(parents=True, exist_ok=True)
    storage = _storage_url(config, out)

    previous_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=storage, study_name=config.study_name, direction=config.direction,
                                    load_if_exists=True)
        old_objective = study.user_attrs.get("objective")
        if old_objective not in (None, config.objective):
            raise BadInputError(f"the study {config.study_name!r} in {storage} optimised {old_objective}, not "
                                f"{config.objective}", "use another --out folder or study_name")
        if study.direction.name.lower() != config.direction:
            raise BadInputError(
                f"the study {config.study_name!r} in {storage} {study.direction.name.lower()}s, but the objective "
                f"{config.objective} is to {config.direction}",
                "use another --out folder or study_name for a different objective")
        space = {p: s.model_dump(exclude_defaults=True) for p, s in config.search_space.items()}
        if study.user_attrs.get("search_space") not in (None, space):
            log.warning("the search space differs from the one this study started with; earlier trials stay")
        study.set_user_attr("objective", config.objective)
        study.set_user_attr("search_space", space)

        # a trial left running by a killed run is marked failed and tried again first (only in the out
        # folder's own study: a shared storage may have other workers running trials right now)
        from optuna.trial import TrialState

        if config.storage is None:
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.tell(t.number, state=TrialState.FAIL)
                study.enqueue_trial(t.params)
                log.warning("trial %d was interrupted; it runs again", t.number)

        finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
        done_before = len(study.get_trials(deepcopy=False, states=finished_states))
        remaining = max(0, n_total - done_before)
        # a resumed study continues with a fresh random stream (a seeded sampler would repeat its first picks)
        study.sampler = _sampler(config, n_total, config.seed + len(study.trials))
        study.pruner = pruner if pruner is not None else _pruner(config)

        sign = 1.0 if config.direction == "minimize" else -1.0
        best_holder: dict[str, Any] = {}

        def current_best() -> int | None:
            try:
                return study.best_trial.number
            except ValueError:
                return None

        def objective(trial) -> float:
            t0 = time.time()
            params = {p: suggest(trial, p, s) for p, s in config.search_space.items()}
            try:
                cfg = trial_config(recipe, params)
            except ValidationError as exc:
                raise BadInputError(f"trial {trial.number}: the parameters {params} make an invalid recipe:\n"
                                    + format_validation_error(exc, "recipe")) from exc
            trial_dir = out / TRIALS_DIR / str(trial.number)
            if trial_dir.exists():
                shutil.rmtree(trial_dir)
            trial_dir.mkdir(parents=True)
            (trial_dir / "config.yaml").write_text(_yaml(cfg.model_dump()), encoding="utf-8")
            run_cfg = cfg.model_copy(update={"model": resolve_ref(cfg.model, workspace)[0],
                                             "data": resolve_ref(cfg.data, workspace)[0],
                                             "val_data": resolve_ref(cfg.val_data, workspace)[0]})
            pruning = _pruning_callback(trial, sign)

            def trial_progress(n: int = 0, status: str | None = None, total: int | None = None) -> None:
                if progress is not None and status:
                    progress(0, status=f"trial {trial.number}: {status}")

            report = run_finetune(run_cfg, trial_dir, workspace=None, progress=trial_progress,
                                  callbacks=[pruning])
            trial.set_user_attr("steps", report.steps)
            trial.set_user_attr("val_loss", report.val_loss)
            trial.set_user_attr("tokens_per_s", report.tokens_per_s)
            if pruning.pruned_at is not None:
                trial.set_user_attr("pruned_at", pruning.pruned_at)
                trial.set_user_attr("seconds", round(time.time() - t0, 1))
                _remove_weights(trial_dir)
                _free_memory()
                raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
            if config.objective == "val_loss":
                if report.val_loss is None:
                    raise BadInputError(f"trial {trial.number} has no validation loss",
                                        "give the recipe validation data (val_data or val_fraction > 0)")
                value = float(report.val_loss)
            else:
                records = fixed_val if fixed_val is not None else _validation_records(cfg, workspace)
                if not records:
                    raise BadInputError(f"trial {trial.number}: no validation records to score "
                                        f"{config.objective} on")
                if progress is not None:
                    progress(0, status=f"trial {trial.number}: scoring {min(len(records), config.eval_limit)} "
                             "answers")
                scores = task_scores(cfg, trial_dir, records[: config.eval_limit],
                                     base_ref=str(resolve_ref(cfg.model, workspace)[0]),
                                     max_new_tokens=config.eval_max_new_tokens)
                trial.set_user_attr("scores", {k: round(v, 6) for k, v in scores.items()})
                if config.objective not in scores:
                    raise BadInputError(f"{config.objective} could not be computed on the validation answers",
                                        "field_accuracy needs JSON answers; use exact_match or val_loss")
                value = float(scores[config.objective])
            trial.set_user_attr("seconds", round(time.time() - t0, 1))
            if not math.isfinite(value):  # a diverged trial: Optuna records it as failed and goes on
                log.warning("trial %d: the objective is %s", trial.number, value)
            shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)
            _free_memory()
            return value

        def after_trial(study_, frozen) -> None:
            best = current_best()
            # only the best trial keeps its weights
            for number in (frozen.number, best_holder.get("best")):
                if number is not None and number != best:
                    _remove_weights(out / TRIALS_DIR / str(number))
            best_holder["best"] = best
            if progress is not None:
                value = f" {config.objective} {frozen.value:.4f}" if frozen.state.name == "COMPLETE" else ""
                best_txt = ""
                if best is not None:
                    best_txt = f" · best: trial {best} ({study_.best_value:.4f})"
                progress(1, status=f"trial {frozen.number} {frozen.state.name.lower()}{value}{best_txt}")
            _write_tables(out, _trial_rows(study_, config), config, best)

        best_holder["best"] = current_best()
        started_before = len(study.trials)
        if progress is not None:
            progress(0, status=f"{done_before} trials done before" if done_before else "starting",
                     total=remaining)
        if remaining:
            import torch

            catch: tuple[type[Exception], ...] = (MemoryError, torch.OutOfMemoryError)
            study.optimize(objective, n_trials=remaining, timeout=timeout, catch=catch,
                           callbacks=[after_trial])
        new_trials = len(study.trials) - started_before

        # the outputs
        best = current_best()
        for t in study.get_trials(deepcopy=False):
            if t.number != best:
                _remove_weights(out / TRIALS_DIR / str(t.number))
        rows = _trial_rows(study, config)
        _write_tables(out, rows, config, best)
        best_file = best_dir = best_params = best_value = None
        if best is not None:
            bt = study.best_trial
            best_params = _decoded_params(bt, config)
            best_value = float(bt.value)
            best_cfg = trial_config(recipe, best_params)
            best_file = str(_write_best(out, best_cfg, best, best_value, config))
            best_dir = str(out / TRIALS_DIR / str(best))
        states = [r["state"] for r in rows]
        result = TuneResult(
            out_dir=str(out), study_name=config.study_name, storage=storage, objective=config.objective,
            direction=config.direction, n_trials=states.count("complete") + states.count("pruned"),
            n_complete=states.count("complete"), n_pruned=states.count("pruned"), n_failed=states.count("fail"),
            new_trials=new_trials, best_trial=best, best_value=best_value, best_params=best_params,
            best_dir=best_dir, best_config_file=best_file, wall_time_s=round(time.time() - t_start, 2),
            search_space={p: s.describe() for p, s in config.search_space.items()}, trials=rows,
            files={"trials_csv": str(out / "trials.csv"), "trials_md": str(out / "trials.md"),
                   "summary": str(out / "summary.json")},
        )
        tmp = out / ".summary.json.tmp"
        tmp.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(out / "summary.json")
        return result
    finally:
        optuna.logging.set_verbosity(previous_verbosity)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


__all__ = ["OBJECTIVES", "TASK_METRICS", "ParamSpec", "TuneConfig", "TuneResult", "check_search_space",
           "format_value", "load_tune_config", "run_tune", "suggest", "task_scores", "trial_config"]
