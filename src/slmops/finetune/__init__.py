"""Fine-tuning: full, LoRA and QLoRA on transformers + PEFT (+ bitsandbytes), with a memory estimate.

- :class:`FinetuneConfig` / :class:`LoraSettings`: the recipe (`slmops finetune --config`).
- :func:`run_finetune`: train and register (adapter or model), returning a :class:`FinetuneReport`.
- :func:`estimate_memory`: the peak training memory from the model's config alone (`--dry-run`).

Heavy libraries load on first use, so importing this package is cheap.
"""

from __future__ import annotations

from typing import Any

from slmops.finetune.config import DEFAULT_LR, FinetuneConfig, LoraSettings

_LAZY = {
    "FinetuneReport": "slmops.finetune.train",
    "run_finetune": "slmops.finetune.train",
    "load_loss_function": "slmops.finetune.train",
    "validate_config": "slmops.finetune.train",
    "estimate_memory": "slmops.finetune.memory",
    "check_qlora_available": "slmops.finetune.lora",
    "qlora_unavailable_reason": "slmops.finetune.lora",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["DEFAULT_LR", "FinetuneConfig", "LoraSettings", *_LAZY]
