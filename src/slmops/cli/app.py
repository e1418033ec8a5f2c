"""The root Typer app, global options and error handling."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from slmops import __version__
from slmops.cli import common

app = typer.Typer(
    name="slmops",
    help=(
        "slmops: the whole life of a small language model on hardware you already own.\n\n"
        "Start with `slmops quickstart`: it generates the bundled demo task, registers the bundled "
        "teacher and evaluates it, offline, in about a minute."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slmops {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    workspace: Annotated[
        Path | None,
        typer.Option(
            "--workspace", "-w", envvar="SLMOPS_HOME",
            help="Workspace folder holding artifacts and the registry (default: ./.slmops, or $SLMOPS_HOME).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs and full tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only print results and errors; no progress bars.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    common.STATE.workspace = workspace or Path(os.environ.get("SLMOPS_HOME") or ".slmops")
    common.STATE.verbose = verbose
    common.STATE.quiet = quiet
    common.configure_logging()


def _register() -> None:
    # each module adds its commands to `app`; imports here are light (no torch)
    from slmops.cli import (  # noqa: F401
        adapters,
        bench,
        chat,
        data,
        demo,
        distill,
        distill_run,
        distill_train,
        evaluate,
        export,
        export_gguf,
        finetune,
        models,
        quickstart,
        registry,
        report,
        rollout,
        run,
        serve,
        tune,
    )


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (used by `main` and by tests)."""
    from slmops.errors import EXIT_FAILURE, SlmopsError

    _register()
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="slmops", standalone_mode=True)
    except SlmopsError as exc:
        common.error(str(exc))
        if common.STATE.verbose:
            import traceback

            traceback.print_exc()
        return exc.exit_code
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    except KeyboardInterrupt:
        common.error("interrupted")
        return 130
    return 0
