"""Engines: one interface for every model run (see `slmops.engines.base.Engine`).

`open_engine(ref)` picks the engine from what the reference is: a Hugging Face model folder (torch), a
PEFT adapter folder (torch: its base model with the adapter on by default), an ONNX Runtime GenAI
folder (``genai_config.json``: ort-genai, see ``slmops export onnx``), a ``.gguf`` file or GGUF export
artifact (llama.cpp, see ``slmops export gguf``), an http(s) URL (a remote OpenAI-compatible server), or a
workspace artifact id/alias whose folder is one of those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops.engines.base import (
    BASE_ADAPTER,
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
        if (path / "adapter_config.json").exists():
            return "adapter"
        if (path / "genai_config.json").exists():
            return "ort-genai"
        if (path / "config.json").exists():
            return "torch"
        if (path / "model.gguf").exists():  # a GGUF export artifact (slmops export gguf)
            return "llama.cpp"
        raise BadInputError(
            f"{path} is not a model folder: no config.json (Hugging Face) or genai_config.json (ONNX)",
            "pass a Hugging Face model folder, or create one with `slmops models create`",
        )
    if path.suffix == ".gguf":
        return "llama.cpp"
    raise BadInputError(f"{path} is not a model: expected a model folder or a .gguf file")


def _local_path(ref_s: str, workspace=None) -> Path | None:
    """The file or folder behind an artifact id, alias or path; None when there is none here."""
    if workspace is not None:
        try:
            return workspace.resolve(ref_s)
        except NotFoundError:
            pass
    p = Path(ref_s).expanduser()
    return p if p.exists() else None


def engine_kind_of(ref: str | Path, workspace=None) -> str:
    """Which engine `open_engine(ref)` would use, without loading anything: "torch", "adapter", "ort-genai",
    "llama.cpp" or "openai-http"."""
    ref_s = str(ref)
    if ref_s.startswith(("http://", "https://")):
        return "openai-http"
    path = _local_path(ref_s, workspace)
    if path is None:
        from slmops.models.load import is_hub_id

        if is_hub_id(ref_s):
            return "torch"
        raise NotFoundError(f"no model, artifact or alias {ref_s!r}", "see `slmops models list`")
    return engine_kind(path)


def open_engine(ref: str | Path, workspace=None, **opts: Any) -> Engine:
    """Open the model behind `ref` (artifact id, alias, folder, file or hub id) with the right engine.

    An adapter folder (or adapter artifact) opens its base model (the adapter artifact's model parent, or
    ``base_model_name_or_path`` in adapter_config.json; ``base=`` overrides) with the adapter loaded under
    its artifact or folder name and used by every request that names no adapter. Torch options such as
    ``adapters={name: folder}`` load more adapters beside it.
    """
    ref_s = str(ref)
    if ref_s.startswith(("http://", "https://")):
        from slmops.engines.openai_http import OpenAIHTTPEngine

        return OpenAIHTTPEngine(ref_s, **opts)  # an OpenAI-compatible server ("URL#model" names the model)
    path = _local_path(ref_s, workspace)
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
    if kind == "adapter":
        return _open_adapter(path, workspace, **opts)
    if kind == "ort-genai":
        from slmops.engines.ortgenai_engine import OrtGenAIEngine

        return OrtGenAIEngine(path, workspace=workspace, **opts)
    if kind == "llama.cpp":
        return _open_gguf(path, workspace, **opts)
    raise BadInputError(f"the {kind} engine is not available in this version of slmops (model: {path})")


def _open_adapter(path: Path, workspace=None, *, base: str | None = None, **opts: Any) -> Engine:
    from slmops.adapters.core import read_adapter, require_base, resolve_ref
    from slmops.engines.torch_engine import TorchEngine

    info = read_adapter(path)
    base_ref = require_base(info, base, workspace)
    base_path, _ = resolve_ref(base_ref, workspace)
    if Path(base_path).exists() and engine_kind(Path(base_path)) != "torch":
        raise BadInputError(f"the base of adapter {path} is not a Hugging Face model folder: {base_path}",
                            "pass base=<model folder> (adapters are served by the torch engine)")
    name = _adapter_name(info)
    adapters = {**(opts.pop("adapters", None) or {})}
    if name in adapters:
        raise BadInputError(f"adapter name {name!r} is given twice")
    adapters = {name: str(info.path), **adapters}
    opts.setdefault("default_adapter", name)
    return TorchEngine(base_path, adapters=adapters, workspace=workspace, **opts)


def _open_gguf(path: Path, workspace=None, **opts: Any) -> Engine:
    """A .gguf file, or a GGUF export artifact folder (model.gguf, plus adapter.lora.gguf used by default)."""
    from slmops.engines.llamacpp_engine import LlamaCppEngine

    if path.is_dir():
        lora = path / "adapter.lora.gguf"
        if lora.is_file() and "adapters" not in opts:
            opts["adapters"] = {"adapter": str(lora)}
            opts.setdefault("default_adapter", "adapter")
        path = path / "model.gguf"
    return LlamaCppEngine(path, workspace=workspace, **opts)


def _adapter_name(info) -> str:
    """The name an adapter folder is loaded under: its artifact name, else its folder name (made valid)."""
    import re

    raw = (info.manifest or {}).get("name") or info.path.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(raw)).strip("-._")[:64] or "adapter"
    return "adapter" if name == BASE_ADAPTER else name


__all__ = [
    "BASE_ADAPTER",
    "Engine", "EngineInfo", "GenerationRequest", "GenerationResult", "Logprobs", "TokenEvent",
    "engine_kind", "engine_kind_of", "open_engine",
]
