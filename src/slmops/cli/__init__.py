"""The `slmops` command line: a thin Typer layer over the Python API.

Heavy libraries (torch, transformers, ...) are imported inside commands so `slmops --help` is instant.
Every `SlmopsError` becomes one clear message and its exit code (0 ok, 1 failure, 2 bad input, 3 gate).
The Typer app lives in `slmops.cli.app`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from slmops.cli.app import run

    sys.exit(run(argv))


__all__ = ["main"]
