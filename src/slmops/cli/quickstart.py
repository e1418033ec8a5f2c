"""`slmops quickstart`: the single place a newcomer starts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app


@app.command("quickstart")
def quickstart(
    workdir: Annotated[Path, typer.Option(help="Folder for the workspace (.slmops), report.md and report.html.")] = Path("slmops-quickstart"),
    seed: Annotated[int, typer.Option(help="Seed for the demo data and training (vars.seed).")] = 0,
    limit: Annotated[int | None, typer.Option(help="Evaluate and measure export parity on only the first N test examples (faster).")] = None,
    distill_steps: Annotated[int, typer.Option(help="Student training steps for the distillation stage (0 skips it: the teacher is fine-tuned and exported).")] = 1200,
    prompts: Annotated[int | None, typer.Option(help="Label only the first N unlabeled prompts (default: all 2,000).")] = None,
    finetune_steps: Annotated[int, typer.Option(help="LoRA fine-tuning steps for the new-intents stage (0 skips it: the model is exported without an adapter).")] = 300,
    export: Annotated[bool, typer.Option("--export/--no-export", help="Export the fine-tuned model to ONNX int4 and GGUF q4_k_m (GGUF needs llama-cpp-python); --no-export skips the exports and their evaluations, gate and promotion.")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any other pipeline override, as for `slmops run`: vars.NAME=V or STEP.OPTION=V (e.g. vars.min_exact_match=0.9, vars.bench_repeats=5). Repeatable.")] = None,
) -> None:
    """Run the life of a model offline on the bundled demo task and teacher, as a cached pipeline, and write one report.

    Runs the pipeline slmops/demo/quickstart.yaml (the same file as examples/quickstart.yaml, so this is `slmops run examples/quickstart.yaml` with the options below as --set overrides): generates the customer-support triage data, registers the bundled teacher, distills it into a student a quarter of its size or less (teacher-labelled prompts, sequence-level training), trains a LoRA adapter on the student for two intents it has never seen, exports the result to ONNX int4 and GGUF q4_k_m (size and parity against the source), evaluates all five variants (teacher, student, fine-tuned, ONNX int4, GGUF) with bootstrap intervals, benchmarks them side by side, gates the ONNX model on the new intents and promotes it.

    Writes <workdir>/report.html (lineage graph, quality vs latency and size, tokens/s and memory, every metric with its interval, gate outcomes) and <workdir>/report.md (a summary: teacher vs student, LoRA before/after, exports; then the same tables). Every step is cached: a second run with the same options recomputes nothing and says so. A failing gate writes the report and exits 3. The workspace is <workdir>/.slmops unless --workspace is given.

    Examples:\n
      slmops quickstart                                     # the full run (a few minutes on 2 cores)\n
      slmops quickstart --workdir qs --limit 24 --prompts 200 --distill-steps 100 --finetune-steps 30\n
      slmops quickstart --set vars.min_exact_match=0.9      # a stricter gate (exit 3 below it)\n
      slmops quickstart --no-export                         # no ONNX/GGUF exports
    """
    from slmops.quickstart import run_quickstart

    ws_path = common.STATE.workspace if common.STATE.workspace != Path(".slmops") else workdir / ".slmops"
    result = run_quickstart(workdir, workspace=ws_path, seed=seed, limit=limit, distill_steps=distill_steps,
                            prompts=prompts, finetune_steps=finetune_steps, export=export, overrides=set_ or [],
                            progress=None if common.STATE.quiet else common.progress, log=common.info,
                            raise_on_gate=False)
    common.console.print(result.summary(), highlight=False, markup=False)
    common.console.print(f"\nreport: {result.report_path} and {result.html_path}", highlight=False, markup=False)
    common.console.print(f"workspace: {ws_path}  (try: slmops -w {ws_path} models list)", highlight=False,
                         markup=False)
    if result.gate_error:
        from slmops.errors import GateFailedError

        raise GateFailedError(result.gate_error, "the report shows every check; lower the bar with "
                              "--set vars.min_exact_match=V, or train longer")
