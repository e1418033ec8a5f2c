"""`slmops run PIPELINE.yaml`: the whole life of a model from one YAML file, with caching and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app


@app.command("run")
def run_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML (see docs/pipeline.md; e.g. examples/quickstart.yaml).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan: which steps run, which are cached, and why. Runs nothing.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="A step interrupted earlier (killed, failed) continues from its own checkpoints instead of starting over. Finished steps are cached either way.")] = False,
    from_step: Annotated[str | None, typer.Option("--from", help="Rerun this step and every step that depends on it, even if cached.")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run only this step (its upstream steps must be cached).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a value: vars.NAME=V, STEP.OPTION=V (dotted for nested: STEP.lora.r=8) or STEP.inputs.NAME=V; V is YAML. Repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (or the plan) as JSON.")] = False,
) -> None:
    """Run a pipeline: demo-data, import, generate, distill, finetune, tune, export, eval, bench, gate, promote and bundle steps, each skipped when nothing it depends on changed.

    The whole file is checked first (unknown kinds and options, missing inputs, references to unknown steps, cycles), every problem listed with its line, before anything runs. Each step's cache key hashes its options, the content of its inputs and the slmops version: an unchanged step prints "cached"; a changed input reruns exactly the steps that depend on it. State lives in WORKSPACE/pipelines/NAME/state.json; outputs are workspace artifacts with their lineage. A run killed at any point continues from the last finished step when run again (--resume also continues an interrupted training from its checkpoints). A failing gate step stops the pipeline with exit code 3.

    Examples:\n
      slmops run examples/quickstart.yaml --dry-run\n
      slmops run examples/quickstart.yaml\n
      slmops run examples/quickstart.yaml --set vars.distill_steps=20 --set vars.prompts=64\n
      slmops run pipeline.yaml --resume            # after a crash or kill\n
      slmops run pipeline.yaml --from distill      # retrain and everything after it\n
      slmops run pipeline.yaml --only eval
    """
    from slmops.pipeline import load_pipeline, run_pipeline

    ws = common.get_workspace()
    pipe = load_pipeline(pipeline, overrides=set_ or [], workspace=ws)
    progress = None if common.STATE.quiet or as_json else common.progress
    if not dry_run:
        common.info(f"pipeline {pipe.name}: {len(pipe.steps)} steps, workspace {ws.root}")
    result = run_pipeline(pipe, ws, dry_run=dry_run, resume=resume, from_step=from_step, only=only,
                          log=common.info, progress=progress)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    if dry_run:
        n_run = len(result.names("run"))
        common.console.print(f"plan for pipeline {pipe.name} ({pipeline}): {n_run} to run, "
                             f"{len(result.cached)} cached" + (f", {len(result.names('skipped'))} not selected"
                                                               if result.names("skipped") else ""),
                             highlight=False, markup=False)
    else:
        common.console.print(f"pipeline {pipe.name}: {len(result.ran)} ran, {len(result.cached)} cached "
                             f"({result.seconds:.1f} s); state {result.state_path}", highlight=False, markup=False)
    common.console.print(result.table(), highlight=False, markup=False)
