"""Errors that the CLI turns into exit codes and one clear message.

Exit codes (the CLI contract): 0 ok, 1 failure, 2 bad usage or bad input, 3 a quality gate failed.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3


class SlmopsError(Exception):
    """Base error: `message` says what went wrong, `hint` says what to do next."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class BadInputError(SlmopsError):
    """The user's input (file, flag, config) is wrong; exit code 2."""

    exit_code = EXIT_BAD_INPUT


class NotFoundError(BadInputError):
    """A referenced artifact, file or model does not exist; exit code 2."""


class IntegrityError(SlmopsError):
    """An artifact's files do not match its manifest; exit code 1."""


class GateFailedError(SlmopsError):
    """A quality gate failed; exit code 3."""

    exit_code = EXIT_GATE_FAILED
