"""Record formats and their normalisation to chat messages.

Five formats are understood (see docs/formats.md):

- ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}``
- ``prompt-completion``: ``{"prompt": ..., "completion": ...}``
- ``input-output``: ``{"input": ..., "output": ...}``
- ``template``: any columns; ``template`` (``"...{field}..."``) renders the user prompt and
  ``completion_field`` (default ``output`` when present) holds the answer
- ``prompt``: ``{"prompt": ...}`` only (prompt sets, e.g. for distillation)

Every record becomes a list of messages ``[{"role", "content"}, ...]``: an optional leading ``system``
message, then ``user`` / ``assistant`` turns alternating and starting with ``user``. A record with an
answer ends with an ``assistant`` message; a prompt ends with a ``user`` message. ``null`` values count
as missing (columnar files fill absent fields with null).
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from slmops.errors import BadInputError

FORMATS = ("chat", "prompt-completion", "input-output", "template", "prompt")
ROLES = ("system", "user", "assistant")
META_KEYS = ("id", "metadata")
MESSAGE_KEYS = ("role", "content", "name")

# problem kinds (readers.py adds malformed-json, malformed-csv, undecodable)
MISSING_FIELD = "missing-field"
UNKNOWN_FIELD = "unknown-field"
WRONG_TYPE = "wrong-type"
EMPTY_CONTENT = "empty-content"
ROLE_ORDER = "role-order"

# prompt key, completion key for the flat formats
_FLAT_KEYS: dict[str, tuple[str, str | None]] = {
    "prompt-completion": ("prompt", "completion"),
    "input-output": ("input", "output"),
    "prompt": ("prompt", None),
}


@dataclass(frozen=True)
class RecordProblem:
    """One problem with one record: a ``kind`` (e.g. ``missing-field``) and a readable ``reason``."""

    kind: str
    reason: str


@dataclass(frozen=True)
class FormatSpec:
    """A resolved format: its name, and for ``template`` the template and the completion field."""

    format: str
    template: str | None = None
    completion_field: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise BadInputError(f"unknown format {self.format!r}", f"use one of: {', '.join(FORMATS)}")
        if self.format == "template" and not self.template:
            raise BadInputError("format 'template' needs --template \"...{field}...\"")
        if self.format != "template" and self.template:
            raise BadInputError(f"--template only applies to format 'template', not {self.format!r}")
        if self.format != "template" and self.completion_field:
            raise BadInputError("--completion-field only applies to format 'template'")
        if self.template is not None:
            template_fields(self.template)

    @property
    def completion_key(self) -> str | None:
        """The top-level field that holds the answer (None for chat and prompt-only formats)."""
        if self.format == "template":
            return self.completion_field
        return _FLAT_KEYS.get(self.format, (None, None))[1]

    def has_completion(self, record: Mapping[str, Any]) -> bool:
        """Whether `record` carries an answer in this format (for chat: ends with an assistant turn)."""
        if self.format == "chat":
            messages = record.get("messages")
            return bool(isinstance(messages, list) and messages and isinstance(messages[-1], Mapping)
                        and messages[-1].get("role") == "assistant")
        key = self.completion_key
        return key is not None and record.get(key) is not None


def template_fields(template: str) -> tuple[str, ...]:
    """The field names used by a ``"...{field}..."`` template; BadInputError if it is malformed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise BadInputError(f"bad --template {template!r}: {exc}", "write literal braces as {{ and }}") from exc
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or any(c in name for c in ".[]"):
            raise BadInputError(f"bad --template field {{{name}}}: use plain column names such as {{question}}")
        if name not in fields:
            fields.append(name)
    if not fields:
        raise BadInputError(f"--template {template!r} uses no {{field}}")
    return tuple(fields)


def _family(keys: set[str]) -> str | None:
    if "messages" in keys:
        return "chat"
    if "prompt" in keys:
        return "prompt-completion"
    if "input" in keys or "output" in keys:
        return "input-output"
    return None


def detect_format(records: Iterable[Any]) -> str:
    """Detect the format from the keys of `records` (non-dict records are ignored).

    Each record votes: ``messages`` -> chat, ``prompt`` -> prompt-completion (or ``prompt`` when no
    record has a ``completion``), ``input``/``output`` -> input-output; the most common wins (ties go
    in that order). Records of another format then fail validation with a clear reason.
    """
    votes: Counter[str] = Counter()
    seen: set[str] = set()
    any_completion = False
    for record in records:
        if not isinstance(record, Mapping):
            continue
        keys = {k for k, v in record.items() if v is not None}
        seen |= keys
        any_completion = any_completion or "completion" in keys
        family = _family(keys)
        if family:
            votes[family] += 1
    if not votes:
        shown = ", ".join(sorted(seen)[:12]) or "(no fields)"
        raise BadInputError(
            f"cannot detect the data format from the fields: {shown}",
            "expected messages, prompt[+completion] or input+output; or pass --template \"...{field}...\"",
        )
    order = ["chat", "prompt-completion", "input-output"]
    family = max(votes, key=lambda f: (votes[f], -order.index(f)))
    if family == "prompt-completion" and not any_completion:
        return "prompt"
    return family


def resolve_spec(
    records: Iterable[Any],
    fmt: str | FormatSpec | None = None,
    template: str | None = None,
    completion_field: str | None = None,
) -> FormatSpec:
    """Turn user options into a :class:`FormatSpec`, detecting what was not given from `records`.

    With a template and no format, the format is ``template``; its completion field defaults to
    ``output`` when some record has one, else the records are prompts.
    """
    if isinstance(fmt, FormatSpec):
        return fmt
    records = list(records)
    if fmt is None:
        fmt = "template" if template else detect_format(records)
    if fmt == "template" and completion_field is None:
        if any(isinstance(r, Mapping) and r.get("output") is not None for r in records):
            completion_field = "output"
    return FormatSpec(fmt, template, completion_field)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _drop_nulls(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is not None}


def _text_problems(value: Any, name: str) -> list[RecordProblem]:
    if not isinstance(value, str):
        return [RecordProblem(WRONG_TYPE, f"wrong type: {name} must be a string, got {_type_name(value)}")]
    if not value.strip():
        return [RecordProblem(EMPTY_CONTENT, f"empty content: {name} is empty or whitespace")]
    return []


def _unknown_keys(record: Mapping[str, Any], allowed: Iterable[str], prefix: str = "") -> list[RecordProblem]:
    allowed = tuple(allowed)
    return [
        RecordProblem(UNKNOWN_FIELD, f"unknown field '{prefix}{key}' (allowed: {', '.join(allowed)})")
        for key in record
        if key not in allowed
    ]


def _check_message(msg: Any, i: int) -> tuple[dict | None, list[RecordProblem]]:
    where = f"messages[{i}]"
    if not isinstance(msg, Mapping):
        return None, [RecordProblem(WRONG_TYPE, f"wrong type: {where} must be an object, got {_type_name(msg)}")]
    msg = _drop_nulls(msg)
    problems = _unknown_keys(msg, MESSAGE_KEYS, f"{where}.")
    for key in ("role", "content"):
        if key not in msg:
            problems.append(RecordProblem(MISSING_FIELD, f"missing required field '{where}.{key}'"))
    role = msg.get("role")
    if role is not None and role not in ROLES:
        problems.append(RecordProblem(
            ROLE_ORDER, f"bad role order: unknown role {role!r} in {where} (allowed: {', '.join(ROLES)})"
        ))
    if "content" in msg:
        problems += _text_problems(msg["content"], f"{where}.content ({role})")
    if "name" in msg and not isinstance(msg["name"], str):
        problems.append(RecordProblem(WRONG_TYPE, f"wrong type: {where}.name must be a string"))
    return ({k: msg[k] for k in MESSAGE_KEYS if k in msg} if not problems else None), problems


def _role_order_problems(roles: list[str], require_completion: bool) -> list[RecordProblem]:
    start = 1 if roles[0] == "system" else 0
    for i, role in enumerate(roles[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role == "system":
            return [RecordProblem(ROLE_ORDER, f"bad role order: system message at messages[{i}]; "
                                              "only one system message, first, is allowed")]
        if role != expected:
            return [RecordProblem(ROLE_ORDER, f"bad role order: messages[{i}] is {role!r}, expected "
                                              f"{expected!r} (user and assistant alternate, user first)")]
    if len(roles) == start:
        return [RecordProblem(ROLE_ORDER, "bad role order: no user message")]
    if require_completion and roles[-1] != "assistant":
        return [RecordProblem(ROLE_ORDER, "bad role order: ends with a user turn; training data must end "
                                          "with an assistant turn")]
    return []


def _normalise_chat(record: Mapping[str, Any], require_completion: bool) -> tuple[list | None, list[RecordProblem]]:
    problems = _unknown_keys(record, ("messages", *META_KEYS))
    if "messages" not in record:
        return None, [*problems, RecordProblem(MISSING_FIELD, "missing required field 'messages'")]
    messages = record["messages"]
    if not isinstance(messages, list):
        return None, [*problems, RecordProblem(
            WRONG_TYPE, f"wrong type: 'messages' must be a list, got {_type_name(messages)}")]
    if not messages:
        return None, [*problems, RecordProblem(EMPTY_CONTENT, "empty content: 'messages' is an empty list")]
    out = []
    for i, msg in enumerate(messages):
        clean, msg_problems = _check_message(msg, i)
        problems += msg_problems
        out.append(clean)
    if problems:
        return None, problems
    problems = _role_order_problems([m["role"] for m in out], require_completion)
    return (out if not problems else None), problems


def _render_template(record: Mapping[str, Any], template: str) -> tuple[str | None, list[RecordProblem]]:
    problems = []
    values = {}
    for name in template_fields(template):
        value = record.get(name)
        if value is None:
            problems.append(RecordProblem(MISSING_FIELD, f"missing required field '{name}' (used by --template)"))
        elif isinstance(value, list | tuple | Mapping):
            problems.append(RecordProblem(
                WRONG_TYPE, f"wrong type: '{name}' must be a string or number, got {_type_name(value)}"))
        else:
            values[name] = value
    if problems:
        return None, problems
    try:
        text = template.format_map(values)
    except (ValueError, TypeError) as exc:
        return None, [RecordProblem(WRONG_TYPE, f"wrong type: cannot render --template: {exc}")]
    if not text.strip():
        return None, [RecordProblem(EMPTY_CONTENT, "empty content: --template renders an empty prompt")]
    return text, []


def _normalise_flat(
    record: Mapping[str, Any], spec: FormatSpec, require_completion: bool
) -> tuple[list | None, list[RecordProblem]]:
    problems: list[RecordProblem] = []
    completion_key = spec.completion_key
    if spec.format == "template":
        prompt, problems = _render_template(record, spec.template or "")
    else:
        prompt_key = _FLAT_KEYS[spec.format][0]
        allowed = [prompt_key, *([completion_key] if completion_key else []), "system", *META_KEYS]
        problems = _unknown_keys(record, allowed)
        prompt = record.get(prompt_key)
        if prompt is None:
            problems.append(RecordProblem(MISSING_FIELD, f"missing required field '{prompt_key}'"))
        else:
            problems += _text_problems(prompt, f"'{prompt_key}'")
        if "system" in record:
            problems += _text_problems(record["system"], "'system'")
    completion = record.get(completion_key) if completion_key else None
    if completion is not None:
        problems += _text_problems(completion, f"'{completion_key}'")
    elif require_completion:
        if completion_key is None:
            problems.append(RecordProblem(MISSING_FIELD, f"format {spec.format!r} has no completion field; "
                                                         "training data needs one"))
        else:
            problems.append(RecordProblem(MISSING_FIELD, f"missing required field '{completion_key}'"))
    if problems:
        return None, problems
    has_system = spec.format != "template" and "system" in record
    messages = [{"role": "system", "content": record["system"]}] if has_system else []
    messages.append({"role": "user", "content": prompt})
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    return messages, []


def normalise_record(
    record: Any, spec: FormatSpec, *, require_completion: bool = False
) -> tuple[list[dict] | None, list[RecordProblem]]:
    """Check one record against `spec`; return ``(messages, [])`` or ``(None, problems)``.

    All problems of the record are returned, not just the first. With `require_completion`, a record
    without an answer (a chat ending with a user turn, a missing completion field) is a problem.
    """
    if not isinstance(record, Mapping):
        return None, [RecordProblem(WRONG_TYPE, f"wrong type: a record must be an object, got {_type_name(record)}")]
    record = _drop_nulls(record)
    if spec.format == "chat":
        return _normalise_chat(record, require_completion)
    return _normalise_flat(record, spec, require_completion)


def to_messages(
    record: Mapping[str, Any],
    fmt: str | FormatSpec | None = None,
    template: str | None = None,
    completion_field: str | None = None,
    *,
    require_completion: bool = False,
) -> list[dict]:
    """Turn one record of any format into chat messages ``[{"role", "content"}, ...]``.

    `fmt` is a format name (see ``FORMATS``) or a :class:`FormatSpec`; when None it is detected from
    the record's keys (``template`` when `template` is given). The answer, when the record has one, is
    the final ``assistant`` message. Raises ``BadInputError`` listing every problem of the record.

    >>> to_messages({"prompt": "2+2?", "completion": "4"})
    [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]
    """
    spec = resolve_spec([record], fmt, template, completion_field)
    messages, problems = normalise_record(record, spec, require_completion=require_completion)
    if messages is None:
        raise BadInputError(f"bad {spec.format} record: " + "; ".join(p.reason for p in problems))
    return messages


def to_prompt_messages(
    record: Mapping[str, Any],
    fmt: str | FormatSpec | None = None,
    template: str | None = None,
    completion_field: str | None = None,
) -> list[dict]:
    """Like :func:`to_messages` but without the final assistant turn: the prompt to send to a model.

    >>> to_prompt_messages({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    [{'role': 'user', 'content': 'hi'}]
    """
    return prompt_part(to_messages(record, fmt, template, completion_field))


def prompt_part(messages: list[dict]) -> list[dict]:
    """`messages` without a final assistant message."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else list(messages)


def completion_part(messages: list[dict]) -> str | None:
    """The content of the final assistant message, or None when `messages` ends with a user turn."""
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None
