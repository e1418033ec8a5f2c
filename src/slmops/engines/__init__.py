"""Engines: one interface for every model run (see `slmops.engines.base.Engine`).

`open_engine(ref)` picks the engine from what the reference is: a Hugging Face model folder (torch), or a
workspace artifact id/alias whose folder is one. Other engines (ONNX Runtime GenAI, llama.cpp, remote
OpenAI-compatible endpoints) plug in here behind the same protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops.engines.base import (
    Engine,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    Logprobs,
    TokenEvent,
)
from slmops.errors import BadInputError, NotFoundError


def engine_kind(path: Path) -> str:
    """Which engine serves the model at `path` (a local file or folder)."""
    if path.is_dir():
        if (path / "genai_config.json").exists():
            return "ort-genai"
        if (path / "config.json").exists():
            return "torch"
        raise BadInputError(
            f"{path} is not a model folder: no config.json (Hugging Face) or genai_config.json (ONNX)",
            "pass a Hugging Face model folder, or create one with `slmops models create`",
        )
    if path.suffix == ".gguf":
        return "llama.cpp"
    raise BadInputError(f"{path} is not a model: expected a model folder or a .gguf file")


def open_engine(ref: str | Path, workspace=None, **opts: Any) -> Engine:
    """Open the model behind `ref` (artifact id, alias, folder, file or hub id) with the right engine."""
    ref_s = str(ref)
    if ref_s.startswith(("http://", "https://")):
        from slmops.engines.openai_http import OpenAIHTTPEngine

        return OpenAIHTTPEngine(ref_s, **opts)  # an OpenAI-compatible server ("URL#model" names the model)
    path: Path | None = None
    if workspace is not None:
        try:
            path = workspace.resolve(ref_s)
        except NotFoundError:
            path = None
    if path is None:
        p = Path(ref_s).expanduser()
        if p.exists():
            path = p
    if path is None:
        from slmops.models.load import is_hub_id

        if is_hub_id(ref_s):
            from slmops.engines.torch_engine import TorchEngine

            return TorchEngine(ref_s, **opts)
        raise NotFoundError(f"no model, artifact or alias {ref_s!r}", "see `slmops models list`")
    kind = engine_kind(path)
    if kind == "torch":
        from slmops.engines.torch_engine import TorchEngine

        return TorchEngine(path, **opts)
    raise BadInputError(f"the {kind} engine is not available in this version of slmops (model: {path})")


__all__ = [
    "Engine", "EngineInfo", "GenerationRequest", "GenerationResult", "Logprobs", "TokenEvent",
    "engine_kind", "open_engine",
]
