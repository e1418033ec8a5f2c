"""Named model presets: create a randomly initialised Hugging Face model from a config.

Tiny presets are for tests and the demo; the real-shape presets (Qwen2.5-0.5B, Llama-3.2-1B) give real
speed and size with random weights (not real quality).
"""

from __future__ import annotations

from typing import Any

from slmops.errors import BadInputError

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        arch="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=176, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "tiny-qwen2": dict(
        arch="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=176, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "demo-teacher": dict(
        arch="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=688, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "demo-student": dict(
        arch="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=344, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b-shape": dict(
        arch="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, max_position_embeddings=32768, tie_word_embeddings=True,
        rope_theta=1000000.0, rms_norm_eps=1e-6, vocab_size=151936,
    ),
    "llama-3.2-1b-shape": dict(
        arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_theta=500000.0, rms_norm_eps=1e-5, vocab_size=128256,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def make_config(preset: str, vocab_size: int | None = None, **overrides: Any):
    """A transformers config for `preset`; `vocab_size` (from the tokenizer) overrides the preset's."""
    if preset not in PRESETS:
        raise BadInputError(
            f"unknown model preset {preset!r}", f"choose one of: {', '.join(preset_names())}"
        )
    spec = dict(PRESETS[preset])
    arch = spec.pop("arch")
    if vocab_size is not None:
        spec["vocab_size"] = vocab_size
    spec.update(overrides)
    rope_theta = spec.pop("rope_theta", 10000.0)
    if arch == "llama":
        from transformers import LlamaConfig as Cfg
    elif arch == "qwen2":
        from transformers import Qwen2Config as Cfg
    else:  # pragma: no cover - presets are static
        raise BadInputError(f"preset {preset!r} has unknown arch {arch!r}")
    cfg = Cfg(**spec, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    return cfg


def create_model(preset: str, vocab_size: int | None = None, seed: int = 0, **overrides: Any):
    """A randomly initialised causal LM for `preset` (deterministic by `seed`)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = make_config(preset, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    return model


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
