"""Merge an adapter into its base: one plain Hugging Face model folder, no PEFT needed to run it."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from slmops.adapters.core import read_adapter, require_base, resolve_ref
from slmops.errors import BadInputError

log = logging.getLogger(__name__)

QLORA_NOTE = ("the adapter was trained with QLoRA (on a 4-bit base): it was merged into the full-precision "
              "(dequantised) base weights, so the merged model can differ slightly from the 4-bit model it was "
              "trained with; evaluate the merged model")


def merge_adapter(base: str | None, adapter: str, out_dir: str | Path | None, *, workspace=None,
                  dtype: str = "float32", name: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Apply `adapter` to `base`, merge its weights in (``merge_and_unload``) and write a model folder.

    `base`: model folder, artifact id/alias (with `workspace`) or hub id; None uses the adapter's own base
    (its artifact's model parent, or ``base_model_name_or_path``). `adapter`: adapter folder or artifact.
    `out_dir`: where the merged model goes (written to a temporary folder beside it, then renamed; an
    existing non-empty folder is refused unless `overwrite`). With a `workspace` the merged model is also
    registered as a ``model`` artifact (named `name`, default the folder or adapter name) whose parents are
    the base and adapter artifacts that are registered; `out_dir` may then be None (artifact only).

    The folder gets the adapter folder's tokenizer when it has one (the tokenizer it was trained with),
    else the base's. A QLoRA adapter is merged into the full-precision base (a quantised base is
    dequantised first) and the returned ``note`` says so.

    Returns ``{"out_dir", "artifact_id", "base", "adapter", "base_artifact", "adapter_artifact", "method",
    "dtype", "parameters", "tokenizer_from", "note"}``. Raises ``BadInputError`` when the adapter does not
    fit the base (other architecture or sizes), ``NotFoundError`` for missing references.
    """
    from slmops.models.load import load_model, load_tokenizer

    if out_dir is None and workspace is None:
        raise BadInputError("nowhere to write the merged model", "pass an output folder (--out DIR)")
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BadInputError(f"output folder {out} exists and is not empty",
                            "choose a new --out folder, or pass --overwrite to replace it")

    adapter_path, adapter_art = resolve_ref(adapter, workspace)
    info = read_adapter(adapter_path)
    base_ref = require_base(info, base, workspace)
    base_path, base_art = resolve_ref(base_ref, workspace)

    notes: list[str] = []
    model = load_model(base_path, dtype=dtype)
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        if not hasattr(model, "dequantize"):
            raise BadInputError(f"base {base_ref} is stored quantised and cannot be dequantised here",
                                "merge into the full-precision base model folder instead")
        model = model.dequantize()
        notes.append("the base was stored quantised: dequantised to full precision before merging")
    if info.is_qlora:
        notes.append(QLORA_NOTE)
    for n in notes:
        log.warning("merge: %s", n)

    from slmops.adapters.core import attach_adapter

    peft_model = attach_adapter(model, info, "default", workspace=workspace)
    merged = peft_model.merge_and_unload(safe_merge=True)
    tok_src = info.path if _has_tokenizer(info.path) else Path(base_path) if Path(base_path).is_dir() else base_path
    tokenizer = load_tokenizer(str(tok_src))
    tokenizer_from = "adapter" if tok_src == info.path else "base"

    from slmops.models.presets import count_parameters

    result: dict[str, Any] = {
        "out_dir": str(out) if out else None, "artifact_id": None, "base": str(base_path), "adapter": str(info.path),
        "base_artifact": base_art, "adapter_artifact": adapter_art, "method": info.method, "dtype": dtype,
        "parameters": count_parameters(merged), "tokenizer_from": tokenizer_from,
        "note": "; ".join(notes) or None,
    }
    if out is not None:
        _write_folder_atomically(merged, tokenizer, out)
    if workspace is not None:
        result["artifact_id"] = _register(workspace, merged, tokenizer, out, result,
                                          name or (out.name if out else _default_name(info, adapter_art, workspace)))
    return result


def _has_tokenizer(folder: Path) -> bool:
    from slmops.models.load import TOKENIZER_FILES

    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _default_name(info, adapter_art: str | None, workspace) -> str:
    if adapter_art is not None:
        row = workspace.registry.get(adapter_art)
        if row is not None:
            return f"{row['name']}-merged"
    return f"{info.path.name}-merged"


def _write_folder_atomically(model, tokenizer, out: Path) -> None:
    from slmops.models.create import write_model_folder

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        write_model_folder(model, tokenizer, tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _register(workspace, model, tokenizer, out: Path | None, result: dict, name: str) -> str:
    from slmops.models.create import write_model_folder

    parents = [a for a in (result["base_artifact"], result["adapter_artifact"]) if a]
    config = {"merged_from": {"base": result["base"], "adapter": result["adapter"]}, "method": result["method"],
              "dtype": result["dtype"], "tokenizer_from": result["tokenizer_from"]}
    if result["note"]:
        config["note"] = result["note"]
    with workspace.create_artifact("model", name, config=config, parents=parents,
                                   metrics={"parameters": result["parameters"]}) as w:
        if out is not None:  # the files just written: hard links where possible (no second copy of the weights)
            for p in out.iterdir():
                if p.is_dir():
                    shutil.copytree(p, w.path / p.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(p, w.path / p.name)
        else:
            write_model_folder(model, tokenizer, w.path)
        return w.id


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


__all__ = ["merge_adapter"]
