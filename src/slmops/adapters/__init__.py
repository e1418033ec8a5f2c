"""Adapters (PEFT, e.g. LoRA/QLoRA): list the registered ones, merge one into its base, and read adapter
folders (which base they belong to, attaching them with checks). Serving several adapters on one base with
fast switching lives in the torch engine (`TorchEngine(adapters=...)`, `GenerationRequest.adapter`).

Heavy libraries (torch, transformers, peft) are imported inside the functions that need them.
"""

from __future__ import annotations

from slmops.adapters.core import (
    AdapterInfo,
    attach_adapter,
    find_base,
    is_adapter_folder,
    read_adapter,
    require_base,
)
from slmops.adapters.listing import list_adapters
from slmops.adapters.merge import merge_adapter

__all__ = [
    "AdapterInfo",
    "attach_adapter",
    "find_base",
    "is_adapter_folder",
    "list_adapters",
    "merge_adapter",
    "read_adapter",
    "require_base",
]
