"""`slmops tune`: hyperparameter search over a fine-tuning recipe (Optuna; resumable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app
from slmops.errors import BadInputError


@app.command("tune")
def tune(
    config: Annotated[Path, typer.Option("--config", help="HPO YAML: recipe (or recipe_file), search_space, objective, sampler, pruner, n_trials.")],
    out: Annotated[Path, typer.Option(help="Output folder: study.db, trials/<n>/, trials.csv, trials.md, best.yaml, summary.json. Run again with the same folder to resume.")],
    n_trials: Annotated[int | None, typer.Option(help="Finished trials wanted in the study, in total (overrides the file's n_trials).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds after which no new trial starts (overrides timeout_s).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and the search space; loads nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (summary.json) as JSON.")] = False,
) -> None:
    """Search a fine-tuning recipe's hyperparameters: each trial is a `slmops finetune` run into OUT/trials/<n>.

    The objective is the validation loss (minimised) or a task metric on greedy validation answers (exact_match, json_valid, field_accuracy; maximised). TPE or random sampling; median pruning stops trials whose validation loss trails earlier trials at the same step. The study is kept in OUT/study.db: running the same command again resumes it, up to --n-trials finished trials. The best trial's complete recipe is written to OUT/best.yaml for `slmops finetune --config`.

    Examples:\n
      slmops tune --config examples/tune-demo.yaml --out runs/hpo\n
      slmops tune --config hpo.yaml --out runs/hpo --n-trials 30 --timeout 3600\n
      slmops tune --config hpo.yaml --out runs/hpo --dry-run\n
      slmops finetune --config runs/hpo/best.yaml --out runs/ft-best
    """
    from slmops.finetune.tune import check_search_space, load_tune_config

    if n_trials is not None and n_trials < 1:
        raise BadInputError(f"--n-trials must be at least 1 (got {n_trials})")
    if timeout is not None and timeout <= 0:
        raise BadInputError(f"--timeout must be positive (got {timeout:g})")
    cfg = load_tune_config(config)
    if dry_run:
        import yaml

        recipe = check_search_space(cfg, source=str(config))
        total = n_trials or cfg.n_trials
        limit = timeout or cfg.timeout_s
        typer.echo(f"# slmops tune --config {config} --out {out}  (dry run: nothing loaded)")
        typer.echo(f"# {total} trials" + (f", at most {limit:g} s" if limit else "") + f"; objective "
                   f"{cfg.objective} ({cfg.direction}); sampler {cfg.sampler}; pruner {cfg.pruner}; "
                   f"storage {cfg.storage or out / 'study.db'} (study {cfg.study_name!r})")
        typer.echo("# search space:")
        for path, spec in cfg.search_space.items():
            typer.echo(f"#   {path}: {spec.describe()}")
        typer.echo("# recipe (the searched fields are set per trial):")
        typer.echo(yaml.safe_dump(recipe.model_dump(), sort_keys=False).rstrip())
        return

    from slmops.finetune.tune import run_tune

    ws = common.get_workspace()
    kw = dict(workspace=ws, n_trials=n_trials, timeout_s=timeout, verbose=common.STATE.verbose)
    if common.STATE.quiet or as_json:
        result = run_tune(cfg, out, **kw)
    else:
        with common.progress(f"tuning ({cfg.objective})", total=None) as advance:
            result = run_tune(cfg, out, progress=advance, **kw)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    _print_result(result)


def _print_result(result) -> None:
    from rich.table import Table

    from slmops.finetune.tune import format_value

    paths = list(result.search_space)
    table = Table(title=f"study {result.study_name!r}: {result.objective} ({result.direction})")
    for col in ("trial", "state", *paths, result.objective, "steps", "seconds"):
        table.add_column(col, justify="right" if col not in ("state",) else "left")
    for r in result.trials:
        state = r["state"] + (f" @{r['pruned_at']}" if r["state"] == "pruned" and r.get("pruned_at") else "")
        style = "bold green" if r["number"] == result.best_trial else None
        table.add_row(str(r["number"]), state, *[format_value(r["params"].get(p, "")) for p in paths],
                      "" if r["objective"] is None else format_value(float(r["objective"])),
                      "" if r["steps"] is None else str(r["steps"]),
                      "" if r["seconds"] is None else f"{r['seconds']:.0f}", style=style)
    common.console.print(table)
    common.console.print(
        f"{result.n_trials} finished trials ({result.n_complete} complete, {result.n_pruned} pruned"
        + (f", {result.n_failed} failed" if result.n_failed else "") + f"; {result.new_trials} run now, "
        f"{result.wall_time_s:.0f} s)")
    if result.best_trial is None:
        common.console.print("[yellow]no trial completed[/]: no best.yaml; see trials.md")
        return
    params = ", ".join(f"{k}={format_value(v)}" for k, v in (result.best_params or {}).items())
    common.console.print(f"best: trial {result.best_trial}, {result.objective} {result.best_value:.4f} ({params})")
    common.console.print(f"  best recipe: {result.best_config_file}  ->  slmops finetune --config "
                         f"{result.best_config_file} --out DIR")
    common.console.print(f"  its weights: {result.best_dir}  ·  tables: {result.files['trials_md']}")
