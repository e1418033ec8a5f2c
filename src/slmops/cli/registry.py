"""`slmops registry ...`: verify artifacts against their manifests, rebuild the index, aliases."""

from __future__ import annotations

from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app
from slmops.errors import IntegrityError

registry_app = typer.Typer(help="Check and maintain the artifact registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("verify")
def verify(refs: Annotated[list[str] | None, typer.Argument(help="Artifacts to check (default: all).")] = None) -> None:
    """Re-hash artifact files and compare with their manifests; exit 1 naming any changed or missing file."""
    ws = common.get_workspace()
    ids = refs or [r["id"] for r in ws.registry.list()]
    bad = []
    for ref in ids:
        res = ws.verify(ref)
        common.console.print(("[green]ok[/]  " if res.ok else "[red]BAD[/] ") + res.describe(), highlight=False)
        if not res.ok:
            bad.append(res.id)
    if bad:
        raise IntegrityError(f"{len(bad)} of {len(ids)} artifacts do not match their manifests: {', '.join(bad)}",
                             "re-create them, or `slmops models rm` them")
    common.info(f"{len(ids)} artifacts verified")


@registry_app.command("rebuild")
def rebuild() -> None:
    """Re-index the registry from the artifact folders (the folders are the truth)."""
    ws = common.get_workspace()
    removed = ws.clean_partials()
    n = ws.rebuild_registry()
    common.console.print(f"indexed {n} artifacts" + (f"; removed {removed} partial folders" if removed else ""))


@registry_app.command("alias")
def alias(name: Annotated[str, typer.Argument(help="Alias to set, e.g. production.")],
          ref: Annotated[str, typer.Argument(help="Artifact id, alias or path it should point at.")],
          reason: Annotated[str, typer.Option(help="Why (kept in the event log).")] = "") -> None:
    """Point an alias at an artifact; every command then accepts the alias wherever it takes a model."""
    ws = common.get_workspace()
    art_id = ws.manifest(ref).id
    prev = ws.registry.set_alias(name, art_id, reason)
    common.console.print(f"{name} -> {art_id}" + (f" (was {prev})" if prev else ""))
