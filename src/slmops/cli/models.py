"""`slmops models ...`: create models from presets, train tokenizers, list/show/lineage/rm artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app
from slmops.errors import BadInputError

models_app = typer.Typer(help="Create, list, inspect and remove models and other artifacts.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("create")
def create(
    preset: Annotated[str | None, typer.Option(help="Preset name, e.g. tiny-llama, tiny-qwen2, demo-student, qwen2.5-0.5b-shape, llama-3.2-1b-shape.")] = None,
    config: Annotated[Path | None, typer.Option(help="A Hugging Face config.json (or YAML) to create the model from, instead of a preset.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer folder (or artifact) to pair the model with.")] = None,
    train_tokenizer: Annotated[Path | None, typer.Option(help="Data file to train a byte-level BPE tokenizer on (any format `slmops data` reads).")] = None,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size when training a tokenizer.")] = 1024,
    name: Annotated[str | None, typer.Option(help="Name to register the model under.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random initialisation.")] = 0,
) -> None:
    """Create a randomly initialised model (preset or config) with a tokenizer, and register it.

    Examples:\n
      slmops models create --preset tiny-llama --train-tokenizer data/train.jsonl --name my-tiny\n
      slmops models create --preset qwen2.5-0.5b-shape --tokenizer ./my-tokenizer
    """
    from slmops.models.create import create_model_artifact

    if (preset is None) == (config is None):
        raise BadInputError("give exactly one of --preset or --config",
                            "list presets with `slmops models presets`")
    if (tokenizer is None) == (train_tokenizer is None):
        raise BadInputError("give exactly one of --tokenizer DIR or --train-tokenizer FILE")
    ws = common.get_workspace()
    with common.progress("creating model", total=None):
        m = create_model_artifact(ws, preset=preset, config_path=config, tokenizer=tokenizer,
                                  train_tokenizer_on=train_tokenizer, vocab_size=vocab_size, name=name, seed=seed)
    common.console.print(f"created [bold]{m.id}[/] ({m.name}): {m.metrics.get('parameters'):,} parameters")
    common.console.print(f"  path: {ws.resolve(m.id)}")


@models_app.command("presets")
def presets() -> None:
    """List the model presets `models create --preset` accepts."""
    from rich.table import Table

    from slmops.models.presets import PRESETS

    table = Table("preset", "arch", "hidden", "layers", "heads", "kv heads", "intermediate")
    for k in sorted(PRESETS):
        p = PRESETS[k]
        table.add_row(k, p["arch"], str(p["hidden_size"]), str(p["num_hidden_layers"]),
                      str(p["num_attention_heads"]), str(p["num_key_value_heads"]), str(p["intermediate_size"]))
    common.console.print(table)


@models_app.command("train-tokenizer")
def train_tokenizer_cmd(
    data: Annotated[Path, typer.Argument(help="Data file to train on (any format `slmops data` reads).")],
    out: Annotated[Path, typer.Option(help="Output folder (Hugging Face tokenizer files).")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size.")] = 1024,
) -> None:
    """Train a byte-level BPE tokenizer (digits split one by one, ChatML chat template) on local text."""
    from slmops.models.create import texts_from_data
    from slmops.models.tokenizer import save_tokenizer, train_bpe_tokenizer

    tok = train_bpe_tokenizer(texts_from_data(data), vocab_size=vocab_size)
    save_tokenizer(tok, out)
    common.console.print(f"tokenizer with {len(tok)} tokens written to {out}")


@models_app.command("list")
def list_cmd(
    kind: Annotated[str | None, typer.Option(help="Only this kind (model, adapter, export, dataset, eval, bench...).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List registered artifacts, newest first."""
    from rich.table import Table

    rows = common.get_workspace().registry.list(kind)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        common.info("no artifacts yet: try `slmops quickstart` or `slmops models create`")
        return
    table = Table("id", "kind", "name", "aliases", "created")
    for r in rows:
        table.add_row(r["id"], r["kind"], r["name"], ", ".join(r["aliases"]), r["created"])
    common.console.print(table)


@models_app.command("show")
def show(ref: Annotated[str, typer.Argument(help="Artifact id, alias or path.")],
         as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON.")] = False) -> None:
    """Show an artifact's manifest: kind, files, config, parents, metrics."""
    ws = common.get_workspace()
    m = ws.manifest(ref)
    if as_json:
        typer.echo(m.to_json())
        return
    common.console.print(f"[bold]{m.id}[/]  kind={m.kind}  name={m.name}  created={m.created}")
    common.console.print(f"  path: {ws.resolve(ref)}")
    common.console.print(f"  parents: {', '.join(m.parents) or '-'}")
    common.console.print(f"  files: {len(m.files)}")
    for k, v in sorted(m.metrics.items()):
        common.console.print(f"  {k}: {v}")


@models_app.command("lineage")
def lineage(ref: Annotated[str, typer.Argument(help="Artifact id, alias or path.")]) -> None:
    """Show what an artifact was made from (ancestors) and what was made from it (descendants)."""
    from rich.tree import Tree

    ws = common.get_workspace()
    m = ws.manifest(ref)
    reg = ws.registry

    def label(art_id: str) -> str:
        row = reg.get(art_id)
        return f"{art_id} [dim]({row['kind']}: {row['name']})[/]" if row else f"{art_id} [red](missing)[/]"

    up = Tree(f"[bold]{label(m.id)}[/] made from")

    def add_parents(node, art_id: str, depth: int = 0) -> None:
        for p in reg.parents(art_id):
            add_parents(node.add(label(p)), p, depth + 1)

    add_parents(up, m.id)
    common.console.print(up)
    down = Tree(f"[bold]{label(m.id)}[/] used by")

    def add_children(node, art_id: str) -> None:
        for c in reg.children(art_id):
            add_children(node.add(label(c)), c)

    add_children(down, m.id)
    common.console.print(down)


@models_app.command("rm")
def rm(ref: Annotated[str, typer.Argument(help="Artifact id or alias.")],
       yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False) -> None:
    """Remove an artifact (refused while other artifacts were made from it)."""
    ws = common.get_workspace()
    m = ws.manifest(ref)
    if not yes and not typer.confirm(f"remove {m.id} ({m.kind}: {m.name})?"):
        raise typer.Abort()
    common.console.print(f"removed {ws.remove(m.id)}")
