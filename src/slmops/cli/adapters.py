"""`slmops adapters ...`: merge an adapter into its base, list registered adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app

adapters_app = typer.Typer(
    help="Adapters (LoRA/QLoRA): merge one into its base model, list the registered ones.",
    no_args_is_help=True,
)
app.add_typer(adapters_app, name="adapters")


@adapters_app.command("merge")
def merge(
    adapter: Annotated[str, typer.Option(help="Adapter: artifact id/alias or a PEFT adapter folder (adapter_config.json).")],
    base: Annotated[str | None, typer.Option(help="Base model: artifact id/alias, folder or hub id (default: the adapter's own base).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the merged model, Hugging Face layout (default: only the registered artifact).")] = None,
    name: Annotated[str | None, typer.Option(help="Name to register the merged model under (default: OUT's folder name, else the adapter's name + -merged).")] = None,
    dtype: Annotated[str, typer.Option(help="Precision to merge and save in: float32, bfloat16 or float16.")] = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Merge an adapter's weights into its base model and register the result as a model.

    The merged model runs and exports like any Hugging Face model; no PEFT is needed to load it.

    Its lineage names the base and the adapter. A QLoRA adapter is merged into the full-precision base.

    An adapter trained on another architecture or size is refused.

    Without --base the adapter's own base is used; without --out only the artifact is written.

    Examples:\n
      slmops adapters merge --adapter my-lora --out merged/\n
      slmops adapters merge --base demo-teacher --adapter runs/lora1 --out merged/ --name gifts\n
      slmops adapters merge --adapter my-lora --json
    """
    from slmops.adapters import merge_adapter

    ws = common.get_workspace()
    with common.progress("merging adapter", total=None):
        res = merge_adapter(base, adapter, out, workspace=ws, dtype=dtype, name=name, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    if res["note"]:
        common.info(f"note: {res['note']}")
    common.console.print(f"merged [bold]{res['adapter']}[/] into [bold]{res['base']}[/]: "
                         f"{res['parameters']:,} parameters, {res['dtype']}")
    if res["out_dir"]:
        common.console.print(f"  folder: {res['out_dir']}")
    common.console.print(f"  registered: {res['artifact_id']}")


@adapters_app.command("list")
def list_cmd(
    base: Annotated[str | None, typer.Option(help="Only adapters of this base model (artifact id, alias or path).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List registered adapters, newest first, with their base model and LoRA settings.

    Examples:\n
      slmops adapters list\n
      slmops adapters list --base demo-teacher --json
    """
    from rich.table import Table

    from slmops.adapters import list_adapters

    rows = list_adapters(common.get_workspace(), base=base)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        common.info("no adapters" + (f" of {base}" if base else "") + " yet: train one with "
                    "`slmops finetune --method lora`")
        return
    table = Table("id", "name", "base", "method", "r", "targets", "aliases", "created")
    for r in rows:
        targets = r["target_modules"]
        table.add_row(r["id"], r["name"], r["base"] or "-", r["method"] or "-", str(r["r"] or "-"),
                      ", ".join(targets) if isinstance(targets, list) else str(targets or "-"),
                      ", ".join(r["aliases"]), r["created"])
    common.console.print(table)
