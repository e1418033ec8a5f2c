"""The locally trained byte-level BPE tokenizer with its ChatML template."""

from __future__ import annotations

import json

import pytest

from slmops.models.load import load_tokenizer
from slmops.models.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, save_tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tok(demo_examples):
    texts = [ex.message for ex in demo_examples] + [ex.answer_text for ex in demo_examples]
    return train_bpe_tokenizer(texts, vocab_size=300)


def _chat(ex):
    return [{"role": "user", "content": ex.message}, {"role": "assistant", "content": ex.answer_text}]


def test_digits_are_split_one_per_token(tok):
    for text in ("ORD-48213", "order #902117 on March 12", "A55555"):
        pieces = [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]
        digits = [p for p in pieces if any(c.isdigit() for c in p)]
        assert digits == [c for c in text if c.isdigit()], pieces
    assert tok.decode(tok("ORD-48213")["input_ids"]) == "ORD-48213"


def test_special_tokens_are_single_tokens(tok):
    for special in SPECIAL_TOKENS:
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok) == 300


def test_chatml_template_renders(tok, demo_examples):
    ex = demo_examples[0]
    text = tok.apply_chat_template(_chat(ex), tokenize=False)
    assert text == (
        f"<|im_start|>user\n{ex.message}<|im_end|>\n<|im_start|>assistant\n{ex.answer_text}<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(_chat(ex)[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n{ex.message}<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_mask_covers_exactly_the_answer_and_im_end(tok, demo_examples):
    for ex in demo_examples[:5]:
        out = tok.apply_chat_template(
            _chat(ex), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = out["input_ids"], out["assistant_masks"]
        assert len(ids) == len(mask) and sum(mask) > 0
        picked = [i for i, m in zip(ids, mask, strict=True) if m]
        start = mask.index(1)
        assert mask[start: start + len(picked)] == [1] * len(picked)  # one contiguous span
        assert tok.decode(picked) == ex.answer_text + "<|im_end|>"
        assert picked == tok(ex.answer_text + "<|im_end|>", add_special_tokens=False)["input_ids"]


def test_save_load_round_trip_keeps_template_and_special_tokens(tok, tmp_path, demo_examples):
    save_tokenizer(tok, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHATML_TEMPLATE
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == CHATML_TEMPLATE
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert loaded.all_special_tokens and set(SPECIAL_TOKENS) <= set(loaded.get_vocab())
    assert len(loaded) == len(tok)
    for ex in demo_examples[:10]:
        assert loaded(ex.message)["input_ids"] == tok(ex.message)["input_ids"]
        chat = _chat(ex)
        assert loaded.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)


def test_shared_tokenizer_fixture_matches(tiny_tokenizer_dir, tok, demo_examples):
    shared = load_tokenizer(tiny_tokenizer_dir)
    assert shared.get_vocab() == tok.get_vocab()
    assert shared.chat_template == CHATML_TEMPLATE
