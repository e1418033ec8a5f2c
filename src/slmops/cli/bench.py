"""`slmops bench`: latency, throughput, memory, size and load time of models, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app
from slmops.errors import BadInputError


def _int_list(value: str | None, flag: str) -> list[int]:
    if not value:
        return []
    try:
        out = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise BadInputError(f"{flag} takes comma-separated integers, got {value!r}", f"e.g. {flag} 1,4,16") from None
    return out


@app.command("bench")
def bench_cmd(
    model: Annotated[list[str], typer.Option(
        "--model", "-m",
        help="Model to measure (repeat for several): artifact id/alias, model folder, .gguf file, or an "
             "OpenAI-compatible URL (http://host:port/v1#model). Ratios are the first model / each other.")],
    prompt_tokens: Annotated[str, typer.Option(
        help="Prompt lengths in tokens, comma-separated, counted with each model's tokenizer through its "
             "chat template.")] = "32,128,512",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 64,
    repeats: Annotated[int, typer.Option(help="Measured rounds; each round runs every prompt length for every "
                                              "model.")] = 5,
    warmup: Annotated[int, typer.Option(help="Unmeasured warm-up rounds first.")] = 2,
    concurrency: Annotated[str | None, typer.Option(
        help="Also measure aggregate tokens/s and TTFT p50/p95 with this many requests in flight, e.g. "
             "1,4,16: in-process through the server's continuous-batching scheduler, or against --server "
             "(default: not measured).")] = None,
    concurrency_requests: Annotated[int | None, typer.Option(
        help="Requests per concurrency level (default: max(2 x level, 8)).")] = None,
    server: Annotated[str | None, typer.Option(
        help="Run the concurrency levels against this OpenAI-compatible server instead, e.g. "
             "http://127.0.0.1:8000/v1#my-model (default: in-process).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="SLMOPS_API_KEY", help="API key for --server.")] = None,
    ignore_eos: Annotated[bool, typer.Option(
        "--ignore-eos/--stop-at-eos",
        help="Keep decoding past end-of-text so every model generates exactly --max-new-tokens (torch and "
             "ort-genai engines).")] = True,
    memory: Annotated[bool, typer.Option(
        "--memory/--no-memory",
        help="Measure load time, peak RSS and RSS growth in a fresh process per model.")] = True,
    long_run: Annotated[int | None, typer.Option(
        help="Requests in the leak check (RSS after warm-up vs after them) (default: max(20, repeats x "
             "prompt lengths)).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for bench.json and bench.md (default: none).")] = None,
    compare_to: Annotated[Path | None, typer.Option(
        help="An earlier bench.json: add new/old ratios per model. Refused when it was measured on "
             "different hardware (default: none).")] = None,
    force_compare: Annotated[bool, typer.Option(
        help="Compare with --compare-to even across different hardware (warns loudly).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print bench.json to stdout instead of the table.")] = False,
) -> None:
    """Measure models side by side: time to first token, decode and prefill tokens/s, end-to-end latency at
    several prompt lengths, CPU utilisation, peak RSS and its growth over a long run, size on disk, load time.

    Models run interleaved in one process (A B, then B A, every prompt length, every round) so that drift
    on a busy machine hits all of them alike; results are medians with the [p25-p75] spread. The results
    record this machine's fingerprint; --compare-to refuses results from other hardware. A model that is a
    workspace artifact gets the numbers in its manifest (metrics "bench").

    Examples:\n
      slmops bench --model demo-teacher --model runs/s1 --out bench/\n
      slmops bench -m model.gguf --prompt-tokens 128,1024 --repeats 10\n
      slmops bench -m demo-teacher --concurrency 1,4,16\n
      slmops bench -m runs/s1 --concurrency 1,8 --server http://127.0.0.1:8000/v1#s1\n
      slmops bench -m runs/s1 --out bench2/ --compare-to bench/bench.json
    """
    from slmops.bench.results import machine_fingerprint
    from slmops.bench.run import (
        BenchConfig,
        compare_results,
        markdown_sections,
        run_bench,
        summary_rows,
        write_bench,
    )

    cfg = BenchConfig(
        models=list(model), prompt_tokens=_int_list(prompt_tokens, "--prompt-tokens"), max_new_tokens=max_new_tokens,
        repeats=repeats, warmup=warmup, concurrency=_int_list(concurrency, "--concurrency"),
        concurrency_requests=concurrency_requests, server=server, api_key=api_key, ignore_eos=ignore_eos,
        memory=memory, long_run=long_run, threads=threads,
    )
    cfg.check()
    old = None
    if compare_to is not None:  # refuse before measuring anything
        if not compare_to.is_file():
            raise BadInputError(f"--compare-to file not found: {compare_to}")
        try:
            old = json.loads(compare_to.read_text())
        except ValueError as exc:
            raise BadInputError(f"{compare_to} is not JSON: {exc}", "pass a bench.json written by slmops bench") from None
        compare_results(old, {"machine": machine_fingerprint(), "rows": []}, force=force_compare, warn=common.error)

    ws = common.get_workspace()
    payload = run_bench(cfg, workspace=ws, progress=None if common.STATE.quiet else common.progress, log=common.info)
    if old is not None:
        payload["compared_to"] = {"path": str(compare_to), **compare_results(old, payload, force=force_compare)}
    if out is not None:
        jpath, mpath = write_bench(payload, out)
        common.info(f"wrote {jpath} and {mpath}")
    if as_json:
        typer.echo(json.dumps(payload, indent=2, default=str))
        return
    _print_table(summary_rows(payload))
    for title, body in markdown_sections(payload)[1:]:
        if title != "By prompt length" or len(cfg.prompt_tokens) > 1:
            common.console.print(f"\n{title}\n\n{body}", markup=False, highlight=False)


def _print_table(rows: list[dict]) -> None:
    """The summary as a rich table; a value's [p25-p75] spread goes on a second line to keep columns narrow."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text("slmops bench: medians, [p25-p75] below"))
    cols = [c for c in rows[0] if c != "engine"]
    for col in cols:
        table.add_column(Text(col), justify="left" if col == "model" else "right")
    for r in rows:
        cells = []
        for col in cols:
            value = str(r[col])
            if col == "model":
                value = f"{value}\n{r['engine']}"
            elif " [" in value:
                value = value.replace(" [", "\n[", 1)
            cells.append(Text(value))
        table.add_row(*cells)
    common.console.print(table)
