"""Create a model artifact: a preset or config with random weights, paired with a tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slmops.errors import BadInputError


def texts_from_data(path: str | Path, limit: int = 20000) -> list[str]:
    """Every message text of a data file (validated first), plus role names, for tokenizer training."""
    from slmops.data import load_dataset_file

    ds = load_dataset_file(path)
    texts = [m["content"] for rec in ds.records[:limit] for m in rec["messages"]]
    return texts + ["system", "user", "assistant"]


def write_model_folder(model, tokenizer, out: Path) -> None:
    """save_pretrained of model and tokenizer, plus the fields older readers expect (top-level
    rope_theta; chat template inside tokenizer_config.json)."""
    from slmops.models.tokenizer import save_tokenizer

    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def create_model_artifact(ws, *, preset: str | None = None, config_path: Path | None = None,
                          tokenizer: str | None = None, train_tokenizer_on: Path | None = None,
                          vocab_size: int = 1024, name: str | None = None, seed: int = 0):
    """Create, save and register a randomly initialised model; returns its manifest."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slmops.models.load import load_tokenizer
    from slmops.models.presets import count_parameters, create_model
    from slmops.models.tokenizer import train_bpe_tokenizer

    parents: list[str] = []
    if tokenizer is not None:
        tok_path = ws.resolve(tokenizer) if not Path(tokenizer).exists() else Path(tokenizer)
        tok = load_tokenizer(str(tok_path))
        parent = ws.artifact_id(tok_path) if (tok_path / "slmops.json").exists() else None
        parents += [parent] if parent else []
    else:
        tok = train_bpe_tokenizer(texts_from_data(train_tokenizer_on), vocab_size=vocab_size)
    if preset is not None:
        model = create_model(preset, vocab_size=len(tok), seed=seed)
        source = {"preset": preset}
    else:
        path = Path(config_path)
        if not path.exists():
            raise BadInputError(f"config file not found: {path}")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(path.read_text())
        else:
            raw = json.loads(path.read_text())
        if "model_type" not in raw:
            raise BadInputError(f"{path}: config has no model_type", "add e.g. `model_type: llama`")
        raw = dict(raw, vocab_size=len(tok))
        cfg = AutoConfig.for_model(**raw)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        source = {"config": raw}
    config = {**source, "seed": seed, "vocab_size": len(tok),
              "tokenizer": str(tokenizer) if tokenizer else f"trained on {train_tokenizer_on}"}
    with ws.create_artifact("model", name or (preset or Path(config_path).stem), config=config, parents=parents,
                            metrics={"parameters": count_parameters(model)}) as w:
        write_model_folder(model, tok, w.path)
        art_id = w.id
    return ws.manifest(art_id)


def copy_model_folder(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.name == "slmops.json":
            continue
        shutil.copytree(p, dst / p.name) if p.is_dir() else shutil.copy2(p, dst / p.name)
