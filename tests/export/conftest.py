"""Fixtures for export tests: the bundled demo teacher (a trained 3.2M-parameter Llama, so logits are peaked
and quantization error is realistic), evaluation records from the demo task, and LoRA adapters with random
non-zero weights (so they change the model's answers).

Nothing here builds an ONNX model: each test module builds the exports it needs once (module scope), since
a build takes 7-15 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def make_lora(base_dir: Path, out: Path, seed: int, *, targets=("q_proj", "v_proj"), r: int = 4, alpha: int | None = None,
              scale: float = 0.5, rslora: bool = False) -> Path:
    """Save a PEFT LoRA adapter for the model in `base_dir` whose A and B matrices are random."""
    import torch
    from peft import LoraConfig, get_peft_model

    from slmops.models.load import load_model

    model = load_model(base_dir)
    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=list(targets),
                     lora_dropout=0.0, task_type="CAUSAL_LM", use_rslora=rslora)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(out)
    acfg = json.loads((out / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    return out


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """The bundled demo teacher (read-only)."""
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR

    return BUNDLED_TEACHER_DIR


@pytest.fixture(scope="session")
def eval_records() -> list[dict]:
    """24 demo-task chat records (user message + reference JSON answer)."""
    from slmops.demo.task import generate, to_chat_row

    return [to_chat_row(ex) for ex in generate(24, seed=11)]


@pytest.fixture(scope="session")
def eval_texts(eval_records) -> list[str]:
    """Whole demo conversations rendered with the teacher's chat template (for perplexity and KL)."""
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR
    from slmops.models.templates import render_chat_template

    template = (BUNDLED_TEACHER_DIR / "chat_template.jinja").read_text()
    return [render_chat_template(template, r["messages"]) for r in eval_records[:12]]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
