"""`slmops export gguf`: a GGUF file for llama.cpp / Ollama, with parity against the source model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.export import export_app


@export_app.command("gguf")
def gguf(
    model: Annotated[str, typer.Option(help="Source model: artifact id/alias or a Hugging Face model folder.")],
    out: Annotated[Path, typer.Option(help="Output .gguf file; a Modelfile for Ollama is written beside it (OUT stem + .Modelfile).")],
    quant: Annotated[str, typer.Option(help="f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_0, q4_k_m, q4_k_s, q4_0, q3_k_m, q2_k, iq4_xs, ... (llama.cpp's names).")] = "q4_k_m",
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter: artifact id/alias or PEFT adapter folder (it must fit --model).")] = None,
    adapter_mode: Annotated[str, typer.Option(help="merge: bake the adapter into the weights; lora: write it as OUT stem + .lora.gguf, applied by llama.cpp/Ollama at load time.")] = "merge",
    imatrix: Annotated[Path | None, typer.Option(help="Calibration text (plain text, or a data file) for an importance matrix that guides quantization.")] = None,
    eval_file: Annotated[Path | None, typer.Option(help="Chat records with reference answers: perplexity, KL, top-1 agreement and exact match vs the source.")] = None,
    eval_limit: Annotated[int, typer.Option(help="At most this many eval records are used.")] = 100,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit for the exact-match evaluation.")] = 96,
    max_ppl_increase: Annotated[float | None, typer.Option(help="Gate: fail (exit 3, nothing written) when perplexity rises more than this fraction (0.05 = 5%).")] = None,
    min_task_retention: Annotated[float | None, typer.Option(help="Gate: fail (exit 3, nothing written) when exact match keeps less than this share of the source's (0.98).")] = None,
    no_parity: Annotated[bool, typer.Option("--no-parity", help="Skip the parity measurement (and gates).")] = False,
    pre_tokenizer: Annotated[str | None, typer.Option(help="Force llama.cpp's pre-tokenizer name (e.g. gpt-2, llama-bpe, qwen2) for a tokenizer the converter does not recognise.")] = None,
    name: Annotated[str | None, typer.Option(help="Artifact name (default: OUT's stem).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for quantizing and parity (default: all cores).")] = None,
    token_embedding_type: Annotated[str | None, typer.Option(help="Type for the token embeddings instead of the mix's (llama-quantize --token-embedding-type), e.g. q4_k: q4_k_m keeps them at q6_k, a large share of a small model.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output files (atomically: the old file stays whole until the new one is complete).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert a model to GGUF with llama.cpp's converter and quantizer, and measure it against the source.

    The export is registered as an `export` artifact (parents: the model and adapter) with its size and parity metrics.

    A parity table is printed: size vs fp16, perplexity, next-token KL and top-1 agreement (on --eval-file, else on built-in probe texts) and, with --eval-file, exact match.

    Tokenizers llama.cpp's converter does not recognise (such as the demo's own BPE) are mapped when they are byte-level BPE with GPT-2 splitting; any other fails before work starts.

    Outputs appear only when complete (an existing file is replaced atomically with --force); a failed gate (exit 3) writes nothing.

    Needs llama-cpp-python and llama.cpp's converter scripts: `make llama-cpp` installs both.

    Examples:\n
      slmops export gguf --model demo-teacher --out teacher-q4.gguf\n
      slmops export gguf --model runs/s1 --quant q8_0 --out s1-q8.gguf --eval-file data/test.jsonl --min-task-retention 0.98\n
      slmops export gguf --model runs/s1 --adapter runs/ft --adapter-mode lora --out s1.gguf\n
      slmops export gguf --model runs/s1 --quant q4_k_m --imatrix calib.txt --out s1-q4-im.gguf --force --json
    """
    from slmops.errors import GateFailedError
    from slmops.export.gguf import export_gguf
    from slmops.export.parity import parity_table

    ws = common.get_workspace()
    try:
        res = export_gguf(model, out, quant=quant, adapter=adapter, adapter_mode=adapter_mode, imatrix_file=imatrix,
                          force=force, workspace=ws, name=name, eval_file=eval_file, eval_limit=eval_limit,
                          max_new_tokens=max_new_tokens,
                          measure=not no_parity, max_ppl_increase=max_ppl_increase,
                          min_task_retention=min_task_retention, pre_tokenizer=pre_tokenizer, threads=threads,
                          token_embedding_type=token_embedding_type,
                          progress=common.info)
    except GateFailedError as e:
        from slmops.cli.export import _gate_failed

        _gate_failed(e, as_json)
        raise
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2, default=str))
        return
    d = res.details
    common.console.print(f"wrote {res.out} ({res.precision}, {res.bytes / 2**20:.1f} MB)", markup=False, highlight=False)
    if res.adapter_file:
        common.console.print(f"  LoRA adapter: {res.adapter_file}", markup=False, highlight=False)
    if res.modelfile:
        common.console.print(f"  Ollama: ollama create NAME -f {res.modelfile}", markup=False, highlight=False)
    if res.artifact_id:
        common.console.print(f"  registered: {res.artifact_id}", markup=False, highlight=False)
    pre = d.get("pre_tokenizer")
    if pre and d.get("pre_tokenizer_detected") is False:
        agree = d.get("tokenizer_agreement") or {}
        rate = agree.get("rate")
        common.info(f"note: llama.cpp pre-tokenizer set to {pre!r} (the converter did not recognise the tokenizer); "
                    f"identical tokenization on {agree.get('identical', '?')}/{agree.get('texts', '?')} probe texts"
                    + ("" if rate in (None, 1.0) else " - check the parity numbers"))
    if d.get("quantize_fallbacks"):
        common.info(f"note: {len(d['quantize_fallbacks'])} tensors kept a wider type (their row length does not fit "
                    f"{res.precision}'s blocks), e.g. {d['quantize_fallbacks'][0]}")
    if res.parity is not None:
        common.console.print(parity_table(res.parity), markup=False, highlight=False)
