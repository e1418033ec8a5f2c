"""`slmops registry ...`: verify artifacts against their manifests, rebuild the index, aliases, and the gated
operations over model aliases (promote, rollback, history); a thin layer over `slmops.registry`."""

from __future__ import annotations

from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app
from slmops.errors import BadInputError, IntegrityError

registry_app = typer.Typer(
    help="Check and maintain the artifact registry; promote models (gated), roll back, show alias history.",
    no_args_is_help=True,
)
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
    """Point an alias at an artifact (unchecked, logged); every command then accepts the alias wherever it takes a model. The gated model aliases NAME@staging and NAME@production move only with `registry promote`."""
    from slmops.registry import GATED_ALIASES, split_alias

    parts = split_alias(name)
    if parts and parts[1] in GATED_ALIASES:
        raise BadInputError(f"{name} is a gated alias: it moves only with `slmops registry promote` (or rollback)",
                            f"slmops registry promote {ref} --to {parts[1]}")
    ws = common.get_workspace()
    art_id = ws.manifest(ref).id
    prev = ws.registry.set_alias(name, art_id, reason)
    common.console.print(f"{name} -> {art_id}" + (f" (was {prev})" if prev else ""))


@registry_app.command("promote")
def promote(
    ref: Annotated[str, typer.Argument(help="Artifact id, alias or path to promote.")],
    to: Annotated[str, typer.Option("--to", help="Alias to point at it: candidate, staging, production or any name.")],
    force: Annotated[bool, typer.Option("--force", help="Promote although its gates failed or were never run (needs --reason; logged).")] = False,
    reason: Annotated[str, typer.Option(help="Why (kept in the event log; required with --force).")] = "",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Re-hash the artifact's files first.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Point NAME@ALIAS (NAME = the artifact's name) at an artifact, only if its recorded quality gates passed.

    Gates are recorded by `slmops eval ... --gate EXPR`. Exit 3 when they failed or were never run (one line says why); --force --reason TEXT overrides, and the override is logged with who, when and why.

    Examples:\n
      slmops registry promote model-20260101-120000-abc123 --to production\n
      slmops registry promote student@candidate --to staging\n
      slmops registry promote model-2026... --to production --force --reason "hotfix, incident 42"
    """
    from slmops.registry import promote as do_promote

    ws = common.get_workspace()
    res = do_promote(ws, ref, to, force=force, reason=reason, verify=verify)
    if as_json:
        import json

        common.console.print_json(json.dumps(res.to_dict()))
        return
    if not res.changed:
        common.console.print(f"{res.ref} already points at {res.id}; nothing changed", highlight=False)
        return
    extra = " (FORCED past the gates: " + res.reason + ")" if res.forced else ""
    common.console.print(f"{res.ref} -> {res.id}" + (f" (was {res.previous})" if res.previous else "") + extra,
                         highlight=False, markup=False)


@registry_app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Model name (or NAME@ALIAS) whose alias to roll back.")],
    alias: Annotated[str, typer.Option(help="Alias to roll back (default: production).")] = "production",
    reason: Annotated[str, typer.Option(help="Why (kept in the event log).")] = "",
) -> None:
    """Restore the previous holder of NAME@ALIAS; run it again to walk further back.

    Examples:\n
      slmops registry rollback student\n
      slmops registry rollback student --alias staging --reason "latency regression"
    """
    from slmops.registry import rollback as do_rollback

    ws = common.get_workspace()
    res = do_rollback(ws, name, alias, reason=reason)
    common.console.print(f"{res.ref} -> {res.restored_id}" + (f" (was {res.replaced_id})" if res.replaced_id else ""),
                         highlight=False, markup=False)


@registry_app.command("history")
def history(
    name: Annotated[str, typer.Argument(help="Model name (an artifact id or alias also works: its name is used).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the events as JSON.")] = False,
) -> None:
    """Every alias change of a model name, oldest first: when, who, action, alias, from, to, why, forced.

    Example: slmops registry history student
    """
    from rich.markup import escape
    from rich.table import Table

    from slmops.registry import history as do_history
    from slmops.registry import split_alias

    ws = common.get_workspace()
    parts = split_alias(name)
    if parts and not do_history(ws, name):
        name = parts[0]
    events = do_history(ws, name)
    if not events:
        names = {r["name"] for r in ws.registry.list()}
        if name not in names:
            try:
                name = ws.manifest(name).name
            except BadInputError:
                shown = ", ".join(sorted(names)[:12]) or "none"
                raise BadInputError(f"no model named {name!r} and no alias events for it",
                                    f"names in this workspace: {shown}") from None
            events = do_history(ws, name)
    if as_json:
        import json

        common.console.print_json(json.dumps([e.to_dict() for e in events]))
        return
    if not events:
        common.console.print(f"no alias events for {name} yet (see `slmops registry promote`)", highlight=False)
        return
    table = Table("when", "who", "action", "alias", "from", "to", "why", "forced", title=f"alias history of {name}")
    for e in events:
        table.add_row(e.at, e.who, e.action, e.alias or "-", e.from_ or "-", e.to or "-", escape(e.reason),
                      "yes" if e.forced else "")
    common.console.print(table)


@registry_app.command("aliases")
def aliases(
    name: Annotated[str | None, typer.Argument(help="Only this model name's aliases (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the aliases as JSON.")] = False,
) -> None:
    """List the current aliases: NAME@ALIAS (and plain aliases) -> artifact id."""
    from dataclasses import asdict

    from rich.table import Table

    from slmops.registry import list_aliases

    ws = common.get_workspace()
    rows = list_aliases(ws, name)
    if as_json:
        import json

        common.console.print_json(json.dumps([asdict(r) for r in rows]))
        return
    table = Table("alias", "artifact", "kind", "updated")
    for r in rows:
        table.add_row(r.ref, r.id, r.kind or "(removed)", r.updated)
    common.console.print(table)
