"""Fixtures for adapter tests: LoRA adapters with random non-zero weights on the tiny model, and a workspace
with the base and two adapters registered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def make_lora(base_dir: Path, out: Path, seed: int, *, targets=("q_proj", "v_proj"), r: int = 4,
              scale: float = 0.5, training: dict | None = None) -> Path:
    """Save a LoRA adapter for the model in `base_dir` whose B matrices are random (so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from slmops.models.load import load_model

    model = load_model(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(out)
    if training is not None:
        (out / "training.json").write_text(json.dumps(training))
    return out


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Two adapters ("a": q/v, "b": q/k/v/o) on the tiny model; base_model_name_or_path is its folder."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": make_lora(tiny_model_dir, root / "a", seed=1),
        "b": make_lora(tiny_model_dir, root / "b", seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    }


def register_adapter(ws, folder: Path, name: str, parents: list[str], method: str = "lora") -> str:
    with ws.create_artifact("adapter", name, config={"method": method}, parents=parents) as w:
        for p in folder.iterdir():
            shutil.copy2(p, w.path / p.name)
        return w.id


@pytest.fixture()
def workspace(tmp_path, tiny_model_dir, lora_dirs):
    """A workspace with the tiny base (`base`, alias `tiny`) and adapters a and b registered on it, and a
    second base (`other`) with adapter c."""
    from slmops.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    base = ws.import_folder(tiny_model_dir, "model", name="tiny").id
    ws.registry.set_alias("tiny", base)
    other = ws.import_folder(tiny_model_dir, "model", name="tiny-copy").id
    ids = {
        "base": base,
        "other": other,
        "a": register_adapter(ws, lora_dirs["a"], "lora-a", [base]),
        "b": register_adapter(ws, lora_dirs["b"], "lora-b", [base]),
        "c": register_adapter(ws, lora_dirs["a"], "lora-c", [other]),
    }
    return ws, ids
