"""`slmops report`: one self-contained HTML page (and report.md, and PNG plots) over the workspace's variants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app


@app.command("report")
def report(
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write; report.md goes beside it (same stem) and the PNG plots into STEM_files/ (default: report.html).")] = Path("report.html"),
    artifact: Annotated[list[str] | None, typer.Option("--artifact", "-a", help="Report only these artifacts (id or alias; repeat the option); their ancestors are drawn in the lineage graph for context (default: every artifact in the workspace).")] = None,
    eval_file: Annotated[list[Path] | None, typer.Option("--eval", help="An eval.json written by `slmops eval --out DIR` (or DIR itself); repeat for several.")] = None,
    bench_file: Annotated[list[Path] | None, typer.Option("--bench", help="A bench.json written by `slmops bench --out DIR` (or DIR itself); repeat for several.")] = None,
    title: Annotated[str, typer.Option(help="The page's title.")] = "slmops report",
    quality: Annotated[str | None, typer.Option(help="The quality metric on the plots' y axis, e.g. token_f1 (default: exact_match, else the metric most variants have).")] = None,
    all_artifacts: Annotated[bool, typer.Option("--all", help="With --eval/--bench files, report every workspace artifact as well (default: only the models in the files and --artifact ones).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Write one self-contained HTML page over your model variants: which one is good enough, and how fast and big.

    The page shows: the lineage graph (which artifact was made from which), quality vs latency and quality vs size scatters of every variant, bar charts of tokens/s and peak memory, a table of every metric with its interval in brackets after the value (bootstrap for quality, p25..p75 for speed), quality-gate outcomes (pass/fail with the reason), export parity (size vs fp16, perplexity ratio, KL, top-1 agreement, retention) and what each stage recorded (training loss, tokens/s, ...). The footer names the machine.

    Numbers come from the workspace manifests (what `slmops eval` and `slmops bench` store for artifacts, plus what distill, finetune and export record) and from eval.json / bench.json files. A variant without bench numbers is still in the tables; the plots leave it out and say so.

    The HTML embeds its plots (no external files or network); the same tables are in report.md, with the plots as PNGs in STEM_files/.

    Examples:\n
      slmops report                                          # every artifact in the workspace -> report.html\n
      slmops report --out reports/week1.html --artifact demo-teacher --artifact model-2026...\n
      slmops report --eval runs/eval/eval.json --bench runs/bench/bench.json --title "int4 vs fp32"\n
      slmops -w qs/.slmops report --quality field_accuracy --json
    """
    from slmops.report import build_report

    ws = common.get_workspace()
    files = build_report(ws, out, artifacts=artifact or None, eval_files=eval_file or [], bench_files=bench_file or [],
                         title=title, quality=quality, use_workspace=True if all_artifacts else None)
    if as_json:
        typer.echo(json.dumps(files.to_dict(), indent=2))
        return
    common.console.print(f"wrote {files.html} ({files.variants} variants, {len(files.plots)} plots)", markup=False,
                         highlight=False)
    common.console.print(f"  markdown: {files.markdown}", markup=False, highlight=False)
    if files.plots:
        common.console.print(f"  plots: {files.plots[0].parent}/", markup=False, highlight=False)
    for name, why in files.not_drawn.items():
        common.info(f"not drawn: {name}: {why}")
    if files.gates_failed:
        common.info(f"failed gate checks: {files.gates_failed} (see the Quality gates section)")
