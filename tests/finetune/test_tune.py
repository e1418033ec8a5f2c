"""Hyperparameter search (`slmops tune`): the HPO file, the study and its outputs, best.yaml reproducing the
best trial, resume, pruning, a task-metric objective through the CLI. Tiny model, 4 steps a trial."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from slmops.config import load_yaml_config
from slmops.errors import BadInputError
from slmops.finetune.config import FinetuneConfig
from slmops.finetune.tune import TuneConfig, check_search_space, load_tune_config, run_tune, trial_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tune-demo.yaml"


def write_rows(path: Path, examples) -> Path:
    from slmops.demo.task import to_chat_row

    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(to_chat_row(ex)) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, demo_examples) -> Path:
    d = tmp_path_factory.mktemp("tune_data")
    write_rows(d / "train.jsonl", demo_examples[:32])
    write_rows(d / "val.jsonl", demo_examples[32:40])
    return d


def recipe(model_dir, data_dir, **kw) -> dict:
    return dict(model=str(model_dir), data=str(data_dir), method="lora", max_steps=4, batch_size=4,
                eval_every=2, save_every=2, threads=1, logging_steps=1, tensorboard=False,
                lora={"r": 4, "alpha": 8}, **kw)


def hpo(model_dir, data_dir, **kw) -> dict:
    base = dict(recipe=recipe(model_dir, data_dir), pruner="none", n_trials=2, seed=0,
                search_space={"lr": {"type": "log", "low": 1e-4, "high": 3e-2},
                              "lora.r": {"type": "choice", "values": [2, 4]}})
    return {**base, **kw}


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir, data_dir):
    out = tmp_path_factory.mktemp("hpo")
    result = run_tune(hpo(tiny_model_dir, data_dir), out)
    return out, result


# ------------------------------------------------------------------------------------------ the HPO file


def test_unknown_keys_rejected_with_key_and_line(tmp_path):
    (tmp_path / "hpo.yaml").write_text(
        "recipe:\n  model: m\n  data: d.jsonl\n  lora:\n    rank: 4\n"
        "search_space:\n  lr: {type: log, low: 1.0e-4, high: 1.0e-2, scale: 2}\n"
        "n_trial: 3\n")
    with pytest.raises(BadInputError) as err:
        load_tune_config(tmp_path / "hpo.yaml")
    msg = str(err.value)
    assert "hpo.yaml:8: n_trial: unknown key" in msg
    assert "hpo.yaml:5: recipe.lora.rank: unknown key" in msg
    assert "hpo.yaml:7: search_space.lr.scale: unknown key" in msg


def test_bad_search_space_rejected(tmp_path):
    (tmp_path / "hpo.yaml").write_text(
        "recipe: {model: m, data: d.jsonl}\nsearch_space:\n"
        "  lora.rank: {type: int, low: 2, high: 8}\n"
        "  batch_size: {type: int, low: 8, high: 2}\n"
        "  lora.dropout: {type: choice}\n"
        "  nothing.here: {type: float, low: 0, high: 1}\n")
    with pytest.raises(BadInputError) as err:
        load_tune_config(tmp_path / "hpo.yaml")
    msg = str(err.value)
    assert "hpo.yaml:3: search_space.lora.rank" in msg and "'lora.rank' is not a fine-tuning recipe field" in msg
    assert "lora has: alpha, bias, dropout, modules_to_save, r," in msg
    assert "hpo.yaml:4: search_space.batch_size" in msg and "low (8) must be below high (2)" in msg
    assert "hpo.yaml:5: search_space.lora.dropout" in msg and "non-empty `values`" in msg
    assert "'nothing.here' is not a fine-tuning recipe field" in msg

    def bad(space: dict, match: str) -> None:
        with pytest.raises((BadInputError, ValueError), match=match):
            cfg = TuneConfig.model_validate({"recipe": {"model": "m", "data": "d"}, "search_space": space})
            check_search_space(cfg)

    bad({"lora.r": {"type": "float", "low": 2, "high": 8}}, "lora.r: the field is an integer; use type: int")
    bad({"method": {"type": "int", "low": 1, "high": 2}}, "search it with type: choice")
    bad({"lora": {"type": "int", "low": 1, "high": 2}}, "group of settings")
    bad({"resume": {"type": "choice", "values": [True]}}, "cannot be searched")
    bad({"lr": {"type": "log", "low": 0, "high": 1e-3}}, "log scale needs low > 0")
    bad({"lora.dropout": {"type": "float", "low": 0.0, "high": 1.0}}, r"value 1.0 makes an invalid recipe")
    bad({"method": {"type": "choice", "values": ["lora", "qlora2"]}}, "'qlora2' makes an invalid recipe")
    bad({}, "empty")
    with pytest.raises(ValueError, match="exactly one of them"):
        TuneConfig.model_validate({"search_space": {"lr": {"type": "log", "low": 1e-4, "high": 1e-3}}})


def test_recipe_file_is_relative_to_the_hpo_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "recipe.yaml").write_text("model: m\ndata: d.jsonl\nmethod: full\n")
    (tmp_path / "sub" / "hpo.yaml").write_text(
        "recipe_file: recipe.yaml\nsearch_space:\n  lr: {type: float, low: 1.0e-5, high: 1.0e-4, log: true}\n"
        "  lora.target_modules: {type: choice, values: [all-linear, [q_proj, v_proj]]}\n")
    cfg = load_tune_config(tmp_path / "sub" / "hpo.yaml")
    assert cfg.resolved_recipe().method == "full"
    assert Path(cfg.recipe_file).is_absolute()
    t = trial_config(cfg.resolved_recipe(), {"lora.target_modules": ["q_proj", "v_proj"], "lr": 3e-5})
    assert t.lora.target_modules == ["q_proj", "v_proj"] and t.lr == 3e-5 and t.resume is False


def test_example_hpo_file_validates():
    cfg = load_tune_config(EXAMPLE)
    recipe_ = check_search_space(cfg, source=str(EXAMPLE))
    assert cfg.objective in ("val_loss", "exact_match") and recipe_.model == "demo-teacher"
    assert {"lr", "lora.r"} <= set(cfg.search_space)


# ------------------------------------------------------------------------------------------- the study


def test_study_writes_tables_and_best_recipe_reproduces(study, data_dir):
    out, result = study
    assert result.n_complete == 2 and result.new_trials == 2 and result.best_trial is not None
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1"] and {r["state"] for r in rows} == {"complete"}
    assert set(rows[0]) >= {"lr", "lora.r", "val_loss", "steps", "seconds"} and rows[0]["steps"] == "4"
    assert "| trial | state | lr | lora.r | val_loss |" in (out / "trials.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_trial"] == result.best_trial and summary["objective"] == "val_loss"
    assert (out / "study.db").is_file()
    # only the best trial keeps its weights; every trial keeps its report and recipe
    for r in rows:
        d = out / "trials" / r["number"]
        assert (d / "training.json").is_file() and (d / "config.yaml").is_file()
        assert (d / "adapter_model.safetensors").is_file() == (int(r["number"]) == result.best_trial)
        assert not (d / "checkpoints").exists()
    # best.yaml is a complete recipe that `slmops finetune --config` accepts ...
    best = load_yaml_config(out / "best.yaml", FinetuneConfig)
    raw = yaml.safe_load((out / "best.yaml").read_text())
    assert set(raw) == set(FinetuneConfig.model_fields) and raw["resume"] is False
    assert best.lora.r == result.best_params["lora.r"] and best.lr == pytest.approx(result.best_params["lr"])
    # ... and training with it gives the best trial's validation loss again
    from slmops.finetune.train import run_finetune

    report = run_finetune(best, out.parent / "repro")
    assert report.val_loss == pytest.approx(result.best_value, abs=1e-4)


def test_rerun_resumes_the_study(study, tiny_model_dir, data_dir):
    out, first = study
    before = {r["number"]: (r["params"], r["objective"]) for r in first.trials}
    again = run_tune(hpo(tiny_model_dir, data_dir), out, n_trials=3)
    assert again.new_trials == 1 and again.n_complete == 3
    assert {r["number"]: (r["params"], r["objective"]) for r in again.trials if r["number"] in before} == before
    assert again.trials[2]["params"] not in [p for p, _ in before.values()]  # a new point, not a replay
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 3
    # nothing left to do: the study already has 3 finished trials
    assert run_tune(hpo(tiny_model_dir, data_dir), out, n_trials=3).new_trials == 0
    # another objective in the same study is refused
    with pytest.raises(BadInputError, match="optimised val_loss"):
        run_tune(hpo(tiny_model_dir, data_dir, objective="json_valid"), out, n_trials=4)


def test_pruner_stops_a_trial(tmp_path, tiny_model_dir, data_dir):
    import optuna

    # every validation loss is above 0: the threshold pruner prunes at the first evaluation (step 2 of 4)
    result = run_tune(hpo(tiny_model_dir, data_dir, n_trials=1), tmp_path / "hpo",
                      pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    assert result.n_pruned == 1 and result.n_complete == 0 and result.best_trial is None
    row = result.trials[0]
    assert row["state"] == "pruned" and row["pruned_at"] == 2 and row["steps"] == 2
    assert not (tmp_path / "hpo" / "best.yaml").exists()
    assert not (tmp_path / "hpo" / "trials" / "0" / "adapter_model.safetensors").exists()
    assert "pruned at step 2" in (tmp_path / "hpo" / "trials.md").read_text()


def test_cli_dry_run_and_task_metric_objective(tmp_path, tiny_model_dir, data_dir, capsys):
    from slmops.cli.app import run
    from slmops.workspace import Workspace

    # the base model by its workspace alias: the trials resolve it (and are not registered themselves)
    ws = str(tmp_path / "ws")
    art = Workspace(ws).import_folder(tiny_model_dir, "model", "tiny-base")
    Workspace(ws).registry.set_alias("tiny-base", art.id)
    cfg = hpo(tiny_model_dir, data_dir, objective="exact_match", eval_limit=3, eval_max_new_tokens=4,
              n_trials=1, sampler="random")
    cfg["recipe"]["model"] = "tiny-base"
    (tmp_path / "hpo.yaml").write_text(yaml.safe_dump(cfg))
    assert run(["-w", ws, "tune", "--config", str(tmp_path / "hpo.yaml"), "--out", str(tmp_path / "o"),
                "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "lr: float in [0.0001, 0.03], log scale" in text and "lora.r: one of 2, 4" in text
    assert "objective exact_match (maximize)" in text and not (tmp_path / "o").exists()

    assert run(["-w", ws, "tune", "--config", str(tmp_path / "hpo.yaml"), "--out", str(tmp_path / "o"),
                "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["objective"] == "exact_match" and result["direction"] == "maximize"
    trial = result["trials"][0]
    assert trial["state"] == "complete" and set(trial["scores"]) >= {"exact_match", "json_valid"}
    assert result["best_value"] == trial["scores"]["exact_match"]
    assert yaml.safe_load((tmp_path / "o" / "best.yaml").read_text())["model"] == "tiny-base"
    assert [a["kind"] for a in Workspace(ws).registry.list()] == ["model"]

    (tmp_path / "bad.yaml").write_text("recipe: {model: m, data: d}\nsearch_space: {lr: {type: log}}\n")
    assert run(["-w", ws, "tune", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o2")]) == 2
    assert "needs both low and high" in capsys.readouterr().err


def test_trial_of_a_killed_run_is_marked_failed_and_run_again(tmp_path, tiny_model_dir, data_dir):
    import optuna

    out = tmp_path / "hpo"
    out.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="tune")
    t = study.ask()  # left running, as by a process that was killed
    lr, r = t.suggest_float("lr", 1e-4, 3e-2, log=True), t.suggest_categorical("lora.r", [2, 4])
    result = run_tune(hpo(tiny_model_dir, data_dir, n_trials=1), out)
    assert [(row["number"], row["state"]) for row in result.trials] == [(0, "fail"), (1, "complete")]
    assert result.trials[1]["params"] == {"lr": lr, "lora.r": r} and result.best_trial == 1
