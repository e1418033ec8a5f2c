"""Request/response capture to a local JSONL file, the feedback loop from production back to training.

Chat requests are written as ``{"messages": [..., {"role": "assistant", "content": answer}]}`` and text
completions as ``{"prompt", "completion"}``: both are formats `slmops data` reads as training data. Every
record goes through a redaction hook first (``--capture-redact``): the built-in ``pii`` masks e-mail
addresses, phone numbers and long digit runs (card/account numbers); ``module:function`` loads the user's
own (it gets the record and returns it changed, or None to drop it).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError

log = logging.getLogger(__name__)

Redactor = Callable[[dict[str, Any]], dict[str, Any] | None]

_PII = [
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[EMAIL]"),
    (re.compile(r"(?<!\w)\+?\d[\d\s().-]{7,}\d(?!\w)"), "[NUMBER]"),
]


def redact_text(text: str) -> str:
    for pattern, repl in _PII:
        text = pattern.sub(repl, text)
    return text


def redact_pii(record: dict[str, Any]) -> dict[str, Any]:
    """Mask e-mail addresses and phone/card-like numbers in every text of a capture record."""
    out = dict(record)
    if "messages" in out:
        out["messages"] = [{**m, "content": redact_text(m.get("content") or "")} for m in out["messages"]]
    for key in ("prompt", "completion"):
        if isinstance(out.get(key), str):
            out[key] = redact_text(out[key])
    return out


def load_redactor(spec: str | None) -> Redactor | None:
    """None, "pii", or "module:function" (a module importable from the current folder or PYTHONPATH)."""
    if not spec:
        return None
    if spec == "pii":
        return redact_pii
    module, _, func = spec.partition(":")
    if not module or not func:
        raise BadInputError(f"--capture-redact {spec!r} is not 'pii' or 'module:function'",
                            "e.g. --capture-redact pii, or --capture-redact myhooks:redact")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise BadInputError(f"cannot load the redaction hook {spec!r}: {exc}",
                            "check the module is importable (PYTHONPATH) and defines the function") from None
    if not callable(fn):
        raise BadInputError(f"the redaction hook {spec!r} is not callable")
    return fn


class Capture:
    """Appends records to a JSONL file (thread-safe), through the redaction hook."""

    def __init__(self, path: str | Path, redact: Redactor | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.redact = redact
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        if self.redact is not None:
            try:
                record = self.redact(record)
            except Exception:  # noqa: BLE001 - a failing hook drops the record rather than leaking it
                log.exception("the capture redaction hook failed; record dropped")
                return
            if record is None:
                return
        line = json.dumps(record, ensure_ascii=False)
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


__all__ = ["Capture", "load_redactor", "redact_pii", "redact_text"]
