"""Export: ONNX for ONNX Runtime GenAI (onnxruntime-genai's model builder), GGUF for llama.cpp / Ollama,
a Foundry Local bundle, and parity of every export with its source model.

Names are imported lazily, so ``import slmops.export`` stays light (no torch, onnx or llama.cpp)::

    from slmops.export import export_onnx, measure_parity
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    # ONNX (export/onnx.py)
    "ExportResult": "slmops.export.onnx",
    "export_onnx": "slmops.export.onnx",
    "export_onnx_adapter": "slmops.export.onnx",
    "supported_architectures": "slmops.export.onnx",
    # Foundry Local bundle (export/foundry.py)
    "FoundryResult": "slmops.export.foundry",
    "export_foundry": "slmops.export.foundry",
    "inference_model_json": "slmops.export.foundry",
    # GGUF (export/gguf.py)
    "export_gguf": "slmops.export.gguf",
    "write_modelfile": "slmops.export.gguf",
    # parity (export/parity.py)
    "ParityReport": "slmops.export.parity",
    "check_gates": "slmops.export.parity",
    "measure_parity": "slmops.export.parity",
    "parity_table": "slmops.export.parity",
    "texts_from_records": "slmops.export.parity",
}
_RENAMED = {"GGUFExportResult": ("slmops.export.gguf", "ExportResult")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'slmops.export' has no attribute {name!r}")


__all__ = sorted([*_LAZY, *_RENAMED])
