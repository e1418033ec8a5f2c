"""Model presets: tiny ones build and run; real-shape configs have the published shapes (never instantiated)."""

from __future__ import annotations

import pytest
import torch

from slmops.errors import BadInputError
from slmops.models.presets import PRESETS, count_parameters, create_model, make_config, preset_names

SMALL_PRESETS = [name for name in preset_names() if name.startswith(("tiny-", "demo-"))]


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_small_presets_build_and_run(name):
    model = create_model(name, vocab_size=300, seed=0)
    spec = PRESETS[name]
    assert model.config.hidden_size == spec["hidden_size"]
    assert model.config.num_hidden_layers == spec["num_hidden_layers"]
    assert model.config.vocab_size == 300
    assert count_parameters(model) < 5_000_000
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 300)
    assert torch.isfinite(logits).all()


def test_seed_makes_creation_deterministic():
    a = create_model("tiny-llama", vocab_size=300, seed=7)
    b = create_model("tiny-llama", vocab_size=300, seed=7)
    c = create_model("tiny-llama", vocab_size=300, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tied_embeddings_are_counted_once():
    model = create_model("tiny-llama", vocab_size=300)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert count_parameters(model) == with_duplicates - 300 * 64


def test_unknown_preset_lists_the_presets():
    with pytest.raises(BadInputError) as e:
        make_config("gpt-17")
    text = str(e.value)
    assert "gpt-17" in text
    for name in preset_names():
        assert name in text
    with pytest.raises(BadInputError):
        create_model("gpt-17")


def test_qwen25_05b_shape():
    cfg = make_config("qwen2.5-0.5b-shape")
    assert cfg.model_type == "qwen2"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        896, 24, 14, 2,
    )
    assert cfg.intermediate_size == 4864
    assert cfg.vocab_size == 151936
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_parameters["rope_theta"] == 1_000_000.0


def test_llama32_1b_shape():
    cfg = make_config("llama-3.2-1b-shape")
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        2048, 16, 32, 8,
    )
    assert cfg.intermediate_size == 8192
    assert cfg.vocab_size == 128256
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_parameters["rope_theta"] == 500_000.0


def test_vocab_and_overrides_apply():
    cfg = make_config("qwen2.5-0.5b-shape", vocab_size=1024, num_hidden_layers=2)
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size) == (1024, 2, 896)
