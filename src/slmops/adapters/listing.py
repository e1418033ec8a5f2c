"""Registered adapters, optionally only those of one base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError


def _base_id(workspace, base: str) -> str:
    """The artifact id behind `base` (id, alias or a registered folder's path)."""
    art = workspace.artifact_id(base)  # NotFoundError (with a hint) when nothing matches
    if art is None or workspace.registry.get(art) is None:
        raise BadInputError(f"{base} is not a registered model, so no adapter can name it as its base",
                            "register it (e.g. `slmops models create`, or a fine-tune with a workspace) or pass "
                            "its artifact id or alias")
    return art


def list_adapters(workspace, base: str | None = None) -> list[dict[str, Any]]:
    """Registered ``adapter`` artifacts, newest first; with `base` (id, alias or path of a registered model)
    only those whose parents include it.

    Each row: ``id``, ``name``, ``path``, ``created``, ``aliases``, ``parents``, ``base`` (the parent that is
    a model, or None), ``method`` (from the manifest's config, or None), ``peft_type``, ``r`` and
    ``target_modules`` (from adapter_config.json, None when unreadable).
    """
    base_id = _base_id(workspace, base) if base is not None else None
    reg = workspace.registry
    out = []
    for row in reg.list("adapter"):
        parents = reg.parents(row["id"])
        if base_id is not None and base_id not in parents:
            continue
        model_parents = [p for p in parents if (reg.get(p) or {}).get("kind") == "model"]
        manifest = json.loads(reg.get(row["id"])["manifest"])
        config = manifest.get("config") or {}
        peft_cfg = _adapter_config(Path(row["path"]))
        target = peft_cfg.get("target_modules")
        out.append({
            **row, "parents": parents, "base": model_parents[0] if model_parents else None,
            "method": config.get("method") if isinstance(config.get("method"), str) else None,
            "peft_type": peft_cfg.get("peft_type"), "r": peft_cfg.get("r"),
            "target_modules": sorted(target) if isinstance(target, list) else target,
        })
    return out


def _adapter_config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["list_adapters"]
