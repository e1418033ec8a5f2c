"""`slmops export ...`: ONNX (onnxruntime-genai) and Foundry Local bundles; `export gguf` lives in
cli/export_gguf.py on the same sub-app. Every export is measured against its source and printed as a
parity table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app

export_app = typer.Typer(
    help=("Convert and quantize a model for edge runtimes: ONNX (ONNX Runtime GenAI, Foundry Local) and GGUF "
          "(llama.cpp, Ollama). Every export is measured against its source: size vs fp16, perplexity, "
          "next-token KL, top-1 agreement and, with --eval-file, exact match."),
    no_args_is_help=True,
)
app.add_typer(export_app, name="export")


def load_eval_records(eval_file: Path | None, limit: int) -> list[dict] | None:
    """Chat records (with reference answers) from `eval_file`, at most `limit` of them."""
    if eval_file is None:
        return None
    from slmops.data import load_dataset_file

    ds = load_dataset_file(eval_file, purpose="train")
    return ds.records[: max(1, limit)]


def _gate_failed(e, as_json: bool) -> None:
    from slmops.export.parity import parity_table

    report = getattr(e, "report", None)
    if report is None:
        return
    if as_json:
        typer.echo(json.dumps({"gate_failed": e.message, "parity": report.to_dict()}, indent=2))
    else:
        common.console.print(parity_table(report), markup=False, highlight=False)


def _print_onnx(res, as_json: bool, extra: dict | None = None) -> None:
    from slmops.export.parity import parity_table

    if as_json:
        typer.echo(json.dumps({**res.to_dict(), **(extra or {})}, indent=2, default=str))
        return
    ratio = f", {res.size_ratio_vs_fp16:.3f}x the fp16 size" if res.size_ratio_vs_fp16 else ""
    common.console.print(f"wrote {res.out_dir} (onnx {res.precision}, {res.execution_provider}, "
                         f"{res.size_bytes / 1e6:.1f} MB{ratio}) in {res.wall_s:.0f} s", markup=False, highlight=False)
    for name, f in res.adapters.items():
        what = "adapter file" if res.adapter_mode == "runtime" else "merged adapter"
        default = " (default)" if name == res.default_adapter else ""
        common.console.print(f"  {what} {name}{default}: {f}", markup=False, highlight=False)
    for k, v in (extra or {}).items():
        common.console.print(f"  {k}: {v}", markup=False, highlight=False)
    if res.artifact_id:
        common.console.print(f"  registered: {res.artifact_id}", markup=False, highlight=False)
    for note in res.notes:
        common.info(f"note: {note}")
    if res.parity is not None:
        common.console.print("")
        common.console.print(parity_table(res.parity), markup=False, highlight=False)
    else:
        common.info("parity: size only (pass --eval-file for perplexity, KL, top-1 agreement and exact match)")


_ADAPTER_HELP = ("LoRA adapter: artifact id/alias or PEFT adapter folder. With --adapter-mode runtime it may be "
                 "repeated, as NAME=DIR to choose the name; the first is the default.")
_MODE_HELP = ("merge: bake the adapter into the weights. runtime: export the base once with swappable LoRA branches "
              "and each adapter as adapters/NAME.onnx_adapter (switched per request).")


@export_app.command("onnx")
def onnx(
    model: Annotated[str, typer.Option(help="Source model: artifact id/alias or a Hugging Face model folder.")],
    out: Annotated[Path, typer.Option(help="Output folder (onnxruntime-genai layout: model.onnx, genai_config.json, tokenizer).")],
    precision: Annotated[str, typer.Option(help="fp32, int8 or int4 (weight-only); fp16 for cuda/dml.")] = "int4",
    adapter: Annotated[list[str] | None, typer.Option(help=_ADAPTER_HELP)] = None,
    adapter_mode: Annotated[str, typer.Option(help=_MODE_HELP)] = "merge",
    block_size: Annotated[int, typer.Option(help="int4/int8 quantization block size: 16, 32, 64, 128 or 256.")] = 32,
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="int4/int8: symmetric (int) or asymmetric (uint, with zero points) quantization.")] = True,
    accuracy_level: Annotated[int, typer.Option(help="int4/int8: the lowest precision the MatMuls compute in: 1 fp32, 2 fp16, 3 bf16, 4 int8 (fastest on CPU), 0 the runtime's default.")] = 4,
    execution_provider: Annotated[str, typer.Option(help="Target runtime device: cpu, cuda or dml.")] = "cpu",
    eval_file: Annotated[Path | None, typer.Option(help="Chat records with reference answers: perplexity, KL, top-1 agreement and exact match vs the source (default: size only).")] = None,
    eval_limit: Annotated[int, typer.Option(help="At most this many eval records are used.")] = 100,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit for the exact-match evaluation.")] = 96,
    max_ppl_increase: Annotated[float | None, typer.Option(help="Gate: fail (exit 3, nothing written) when perplexity rises more than this fraction (0.05 = 5%).")] = None,
    min_task_retention: Annotated[float | None, typer.Option(help="Gate: fail (exit 3, nothing written) when exact match keeps less than this share of the source's (0.98).")] = None,
    name: Annotated[str | None, typer.Option(help="Artifact name (default: OUT's folder name).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT (only once the new export is complete).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export a model to ONNX for ONNX Runtime GenAI with onnxruntime-genai's model builder, offline.

    The folder loads in onnxruntime-genai and in `slmops eval/bench/serve` (the ort-genai engine), and is registered as an `export` artifact (parents: the model and adapters) with its size and parity metrics.

    Everything is checked before work starts: architecture, tokenizer, adapter rank/shapes/targets against the base, precision for the execution provider. OUT is written in full beside itself and renamed into place: a failure never leaves a partial folder, and an existing OUT is kept unless --force.

    Examples:\n
      slmops export onnx --model demo-teacher --out exports/teacher-int4\n
      slmops export onnx --model runs/s1 --precision int8 --out exports/s1-int8 --eval-file data/test.jsonl --min-task-retention 0.98\n
      slmops export onnx --model runs/s1 --adapter runs/ft --out exports/s1-ft-int4\n
      slmops export onnx --model runs/s1 --adapter gifts=runs/ft1 --adapter subs=runs/ft2 --adapter-mode runtime --out exports/s1-multi\n
      slmops export onnx --model runs/s1 --precision int4 --block-size 64 --asymmetric --out exports/s1-b64 --force --json
    """
    from slmops.errors import GateFailedError
    from slmops.export.onnx import export_onnx

    ws = common.get_workspace()
    records = load_eval_records(eval_file, eval_limit)
    try:
        res = export_onnx(model, out, precision=precision, adapter=adapter or None, adapter_mode=adapter_mode,
                          int4_block_size=block_size, int4_symmetric=symmetric, int4_accuracy_level=accuracy_level,
                          execution_provider=execution_provider, force=force, workspace=ws, name=name,
                          eval_records=records, max_new_tokens=max_new_tokens, max_ppl_increase=max_ppl_increase,
                          min_task_retention=min_task_retention, progress=common.info)
    except GateFailedError as e:
        _gate_failed(e, as_json)
        raise
    _print_onnx(res, as_json)


@export_app.command("onnx-adapter")
def onnx_adapter(
    adapter: Annotated[str, typer.Option(help="LoRA adapter: artifact id/alias or PEFT adapter folder.")],
    export: Annotated[Path, typer.Option(help="An ONNX export folder made with --adapter-mode runtime.")],
    name: Annotated[str | None, typer.Option(help="Adapter name (default: the adapter's artifact or folder name).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an adapter file of the same name.")] = False,
) -> None:
    """Add another LoRA adapter to a runtime-mode ONNX export, as adapters/NAME.onnx_adapter.

    Refused before anything is written when the adapter does not fit the export: a projection the export has no LoRA branch for, or shapes of another base.

    Examples:\n
      slmops export onnx-adapter --adapter runs/ft3 --export exports/s1-multi --name returns
    """
    from slmops.export.onnx import export_onnx_adapter

    path = export_onnx_adapter(adapter, export, name=name, workspace=common.get_workspace(), force=force)
    common.console.print(f"wrote {path}", markup=False, highlight=False)


@export_app.command("foundry")
def foundry(
    model: Annotated[str, typer.Option(help="Source model: artifact id/alias or a Hugging Face model folder.")],
    out: Annotated[Path, typer.Option(help="Output folder: the Foundry Local model folder (ONNX export + inference_model.json).")],
    precision: Annotated[str, typer.Option(help="fp32, int8 or int4; fp16 for cuda/dml.")] = "int4",
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter to merge in: artifact id/alias or PEFT adapter folder.")] = None,
    gguf: Annotated[Path | None, typer.Option(help="A GGUF file of the same model: an Ollama Modelfile is written beside it.")] = None,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Name in inference_model.json (default: OUT's folder name).")] = None,
    version: Annotated[str, typer.Option(help="Version in inference_model.json.")] = "1",
    system_prompt: Annotated[str | None, typer.Option(help="A system prompt to bake into the PromptTemplate's prompt.")] = None,
    execution_provider: Annotated[str, typer.Option(help="Target device: cpu, cuda or dml.")] = "cpu",
    eval_file: Annotated[Path | None, typer.Option(help="Chat records with reference answers for the parity table.")] = None,
    eval_limit: Annotated[int, typer.Option(help="At most this many eval records are used.")] = 100,
    max_ppl_increase: Annotated[float | None, typer.Option(help="Gate: fail (exit 3) when perplexity rises more than this fraction.")] = None,
    min_task_retention: Annotated[float | None, typer.Option(help="Gate: fail (exit 3) when exact match keeps less than this share.")] = None,
    name: Annotated[str | None, typer.Option(help="Artifact name (default: OUT's folder name).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT (only once the new bundle is complete).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a Foundry Local custom-model folder: the ONNX export plus inference_model.json.

    inference_model.json holds Name, Version, the PromptTemplate derived from the model's chat template and ModelConfig defaults. Put OUT into Foundry Local's model cache to run it (see `foundry cache --help`). With --gguf, an Ollama Modelfile (FROM, TEMPLATE, PARAMETER stop) is written beside that GGUF file, so the same model drops into either runtime.

    Examples:\n
      slmops export foundry --model demo-teacher --out foundry/demo-teacher\n
      slmops export foundry --model runs/s1 --adapter runs/ft --out foundry/s1-ft --model-name support-triage --version 2\n
      slmops export foundry --model runs/s1 --out foundry/s1 --gguf exports/s1-q4.gguf --eval-file data/test.jsonl
    """
    from slmops.errors import GateFailedError
    from slmops.export.foundry import export_foundry

    ws = common.get_workspace()
    records = load_eval_records(eval_file, eval_limit)
    try:
        res = export_foundry(model, out, precision=precision, adapter=adapter, gguf=gguf, model_name=model_name,
                             version=version, system_prompt=system_prompt, execution_provider=execution_provider,
                             force=force, workspace=ws, name=name, eval_records=records,
                             max_ppl_increase=max_ppl_increase, min_task_retention=min_task_retention,
                             progress=common.info)
    except GateFailedError as e:
        _gate_failed(e, as_json)
        raise
    extra = {"inference_model.json": str(Path(res.export.out_dir) / "inference_model.json")}
    if res.modelfile:
        extra["Ollama Modelfile"] = f"{res.modelfile} (ollama create NAME -f {res.modelfile})"
    _print_onnx(res.export, as_json, extra)
