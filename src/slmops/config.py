"""Pydantic base for every config: unknown keys are rejected, errors name the field, file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from slmops.errors import BadInputError

T = TypeVar("T", bound="StrictModel")


class StrictModel(BaseModel):
    """Base for all slmops configs: extra keys are an error, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping = loader.construct_mapping(node, deep=deep)
    lines = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        lines[key] = key_node.start_mark.line + 1
    mapping["__lines__"] = lines
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip_lines(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_lines(v) for k, v in obj.items() if k != "__lines__"}
    if isinstance(obj, list):
        return [_strip_lines(v) for v in obj]
    return obj


def _line_of(obj: Any, loc: tuple) -> int | None:
    line = None
    for part in loc:
        if isinstance(obj, dict):
            line = obj.get("__lines__", {}).get(part, line)
            obj = obj.get(part)
        elif isinstance(obj, list) and isinstance(part, int) and part < len(obj):
            obj = obj[part]
        else:
            break
    return line


def format_validation_error(err: ValidationError, source: str, raw: Any = None) -> str:
    """One line per problem: `file:line: field: message (fix)`."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc) or "(root)"
        line = _line_of(raw, loc) if raw is not None else None
        where = f"{source}:{line}" if line else source
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required key is missing; add it"
        out.append(f"{where}: {field}: {msg}")
    return "\n".join(out)


def load_yaml_config(path: str | Path, model: type[T]) -> T:
    """Read a YAML file into `model`, reporting every problem at once with its line."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"config file not found: {path}", "check the path")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise BadInputError(f"{path}: not valid YAML: {exc}") from exc
    raw = raw or {}
    try:
        return model.model_validate(_strip_lines(raw))
    except ValidationError as exc:
        raise BadInputError(f"invalid config {path}:\n" + format_validation_error(exc, str(path), raw)) from exc
