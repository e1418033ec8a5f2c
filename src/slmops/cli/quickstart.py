"""`slmops quickstart`: the single place a newcomer starts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app


@app.command("quickstart")
def quickstart(
    workdir: Annotated[Path, typer.Option(help="Folder for the data, the workspace and report.md.")] = Path("slmops-quickstart"),
    seed: Annotated[int, typer.Option(help="Seed for the demo data.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Evaluate on only the first N test examples (faster).")] = None,
    distill_steps: Annotated[int, typer.Option(help="Student training steps for the distillation stage (0 skips it).")] = 1200,
    prompts: Annotated[int | None, typer.Option(help="Label only the first N unlabeled prompts (default: all 2,000).")] = None,
    finetune_steps: Annotated[int, typer.Option(help="LoRA fine-tuning steps for the new-intents stage (0 skips it).")] = 300,
    export: Annotated[bool, typer.Option("--export/--no-export", help="Export the fine-tuned model to ONNX int4 and GGUF q4_k_m with a parity table.")] = True,
) -> None:
    """Run the life of a model offline on the bundled demo task and teacher.

    Generates the customer-support triage data, registers the bundled teacher, evaluates it through the
    torch engine (exact match, per-field accuracy, JSON validity, latency), distills it into a student a
    quarter of its size or less (teacher-labelled prompts, sequence-level training), compares the two side by side,
    trains a LoRA adapter on the student for two intents it has never seen (scored before/after, on the new
    intents and the original task), exports it to ONNX int4 and GGUF q4_k_m (size and parity against the
    source) and writes report.md.
    The workspace is <workdir>/.slmops unless --workspace is given.
    """
    from slmops.quickstart import run_quickstart

    ws_path = common.STATE.workspace if common.STATE.workspace != Path(".slmops") else workdir / ".slmops"
    result = run_quickstart(workdir, workspace=ws_path, seed=seed, limit=limit, distill_steps=distill_steps,
                            prompts=prompts, finetune_steps=finetune_steps, export=export, progress=None if common.STATE.quiet else common.progress,
                            log=common.info)
    common.console.print(result.summary())
    common.console.print(f"\nreport: {result.report_path}")
    common.console.print(f"workspace: {ws_path}  (try: slmops -w {ws_path} models list)")
