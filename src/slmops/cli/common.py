"""State and helpers shared by CLI commands: workspace, console output, progress bars."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console


@dataclass
class State:
    workspace: Path = field(default_factory=lambda: Path(".slmops"))
    verbose: bool = False
    quiet: bool = False


STATE = State()
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def configure_logging() -> None:
    level = logging.DEBUG if STATE.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns on import about an optional faster CPU kernel package; everything works without it
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.DEBUG if STATE.verbose else logging.ERROR)
    if not STATE.verbose:
        import os
        import warnings

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def info(msg: str) -> None:
    """A progress/status message on stderr (hidden by --quiet); `msg` is plain text, not markup."""
    from rich.markup import escape

    if not STATE.quiet:
        err_console.print(escape(msg), highlight=False)


def error(msg: str) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False)


def get_workspace():
    """The Workspace for this invocation (created on first use)."""
    from slmops.workspace import Workspace

    return Workspace(STATE.workspace)


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator:
    """A rich progress bar; yields `advance(n=1, **fields)`. Silent with --quiet."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if STATE.quiet:
        yield lambda n=1, **kw: None
        return
    columns = [
        SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=err_console, transient=False) as prog:
        task_id = prog.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None, total: int | None = None) -> None:
            kw = {}
            if status is not None:
                kw["status"] = status
            if total is not None:
                kw["total"] = total
            prog.update(task_id, advance=n, **kw)

        yield advance
