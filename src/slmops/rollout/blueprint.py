"""The blueprint: which model variant each class of device runs, and the smoke test that must pass on it.

A blueprint is a YAML file (every unknown key or bad value is reported with its file:line)::

    name: support                       # served model name (clients put it in `model`)
    profiles:
      cpu-avx2-8gb:
        variant:
          model: exports/s1-int4        # workspace artifact id / alias, or a path (relative to this file)
          format: onnx                  # hf | onnx | gguf
          precision: int4
          engine: ort-genai             # default from the format: hf -> torch, onnx -> ort-genai, gguf -> llama.cpp
          max_context: 2048
          engine_options: {threads: 4}
        smoke:
          data: smoke/support.jsonl     # chat records; the last message of each is the reference answer
          gate: exact_match>=0.8        # one expression or a list (see slmops.evaluate.gates)
          max_new_tokens: 64
      cpu-arm-4gb: ...

Paths are resolved relative to the blueprint's folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from slmops.config import StrictModel, load_yaml_config
from slmops.errors import BadInputError

Format = Literal["hf", "onnx", "gguf"]
EngineName = Literal["torch", "ort-genai", "llama.cpp", "vllm"]
DEFAULT_ENGINE: dict[str, str] = {"hf": "torch", "onnx": "ort-genai", "gguf": "llama.cpp"}
ENGINES_FOR_FORMAT: dict[str, tuple[str, ...]] = {"hf": ("torch", "vllm"), "onnx": ("ort-genai",),
                                                  "gguf": ("llama.cpp",)}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class VariantSpec(StrictModel):
    """The model a device class runs."""

    model: str = Field(description="workspace artifact id / alias, or a path (relative to the blueprint)")
    format: Format
    precision: str = "fp32"
    engine: EngineName | None = None
    max_context: int = Field(2048, ge=16)
    engine_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _engine(self) -> VariantSpec:
        if self.engine is None:
            self.__dict__["engine"] = DEFAULT_ENGINE[self.format]
        elif self.engine not in ENGINES_FOR_FORMAT[self.format]:
            raise ValueError(f"engine {self.engine!r} cannot run format {self.format!r} "
                             f"(use {' or '.join(ENGINES_FOR_FORMAT[self.format])})")
        return self


class SmokeSpec(StrictModel):
    """The test a device runs on a new version before switching to it."""

    data: str = Field(description="JSONL of chat records whose last (assistant) message is the reference")
    gate: list[str] = Field(default_factory=lambda: ["exact_match>=0.8"])
    max_new_tokens: int = Field(64, ge=1, le=4096)
    limit: int | None = Field(None, ge=1, description="use only the first N records")

    @field_validator("gate", mode="before")
    @classmethod
    def _one_or_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("gate")
    @classmethod
    def _parse(cls, v: list[str]) -> list[str]:
        from slmops.evaluate.gates import parse_gate

        if not v:
            raise ValueError("give at least one gate, e.g. exact_match>=0.8")
        for expr in v:
            try:
                parse_gate(expr)
            except BadInputError as exc:
                raise ValueError(exc.message) from None
        return v


class ProfileSpec(StrictModel):
    variant: VariantSpec
    smoke: SmokeSpec
    serve_name: str | None = None
    description: str = ""


class Blueprint(StrictModel):
    """Device classes -> the variant each runs and its smoke test."""

    name: str = "model"
    profiles: dict[str, ProfileSpec]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("a name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, v: dict[str, ProfileSpec]) -> dict[str, ProfileSpec]:
        if not v:
            raise ValueError("a blueprint needs at least one profile")
        for key in v:
            if not NAME_RE.match(str(key)):
                raise ValueError(f"profile name {key!r}: use letters, digits, '.', '_' or '-' (e.g. cpu-avx2-8gb)")
        return v

    # set by load_blueprint: the folder relative paths are resolved against
    _base_dir: Path | None = PrivateAttr(None)

    @property
    def base_dir(self) -> Path | None:
        return self._base_dir

    def path(self, p: str) -> Path:
        """`p` resolved against the blueprint's folder (absolute and ~ paths stay as they are)."""
        q = Path(p).expanduser()
        if not q.is_absolute() and self._base_dir is not None:
            q = self._base_dir / q
        return q


def load_blueprint(path: str | Path) -> Blueprint:
    """Read and validate a blueprint YAML (errors name file:line); checks that every smoke file exists and
    holds chat records ending with an assistant answer."""
    path = Path(path)
    bp = load_yaml_config(path, Blueprint)
    bp._base_dir = path.resolve().parent
    problems = []
    for name, prof in bp.profiles.items():
        data = bp.path(prof.smoke.data)
        if not data.is_file():
            problems.append(f"{path}: profiles.{name}.smoke.data: no such file {data}")
            continue
        try:
            read_smoke_records(data)
        except BadInputError as exc:
            problems.append(f"{path}: profiles.{name}.smoke.data: {exc.message}")
    if problems:
        raise BadInputError(f"invalid blueprint {path}:\n" + "\n".join(problems))
    return bp


def read_smoke_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """Chat records (``{"messages": [...]}``) of a smoke file; each must end with an assistant message."""
    path = Path(path)
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path}:{i}: not valid JSON: {exc.msg}") from None
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if (not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict)
                or msgs[-1].get("role") != "assistant"):
            raise BadInputError(f"{path}:{i}: a smoke record is {{\"messages\": [...]}} ending with the "
                                "assistant's reference answer")
        out.append(rec)
    if not out:
        raise BadInputError(f"{path}: no smoke records")
    return out[:limit] if limit else out


__all__ = ["Blueprint", "ProfileSpec", "SmokeSpec", "VariantSpec", "load_blueprint", "read_smoke_records"]
