"""Shared test fixtures: a tiny tokenizer and a tiny model folder, built once per test session.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` is set for the whole session (unless the
environment already sets it) so no test can hang on the unreachable Hugging Face Hub. A test that needs the
online code path unsets it with ``monkeypatch.delenv("HF_HUB_OFFLINE")``.

Fixtures for reuse in every test package:

``demo_examples``
    300 demo-task examples (``slmops.demo.task.generate(300, seed=0)``): customer messages with their
    one-line JSON answers.
``tiny_tokenizer_dir``
    A folder with a byte-level BPE tokenizer (vocab 300, digits split one per token, ChatML chat template
    with ``{% generation %}`` tags; eos ``<|im_end|>``, pad ``<|endoftext|>``) trained on those examples
    and saved with ``slmops.models.tokenizer.save_tokenizer``. Load it with ``load_tokenizer(dir)``.
``tiny_model_dir``
    A folder with a randomly initialised ``tiny-llama`` preset model (about 60k parameters, fp32,
    ``model.safetensors``, seed 0, vocab = len(tokenizer)) and the same tokenizer: a complete Hugging Face
    model folder for ``load_model`` / ``AutoModelForCausalLM.from_pretrained``, export and engine tests.

Both folders are shared by the session: treat them as read-only (copy them with ``shutil.copytree`` into
``tmp_path`` before changing anything).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_VOCAB_SIZE = 300
TINY_MODEL_PRESET = "tiny-llama"


@pytest.fixture(scope="session")
def demo_examples():
    """300 deterministic demo-task examples (message + JSON answer)."""
    from slmops.demo.task import generate

    return generate(300, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, demo_examples) -> Path:
    """A saved tiny ChatML BPE tokenizer (vocab 300) trained on the demo messages and answers. Read-only."""
    from slmops.models.tokenizer import save_tokenizer, train_bpe_tokenizer

    texts = [ex.message for ex in demo_examples] + [ex.answer_text for ex in demo_examples]
    tok = train_bpe_tokenizer(texts, vocab_size=TINY_VOCAB_SIZE)
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A complete HF folder: random tiny-llama weights (seed 0, safetensors) + the tiny tokenizer. Read-only."""
    from transformers import AutoTokenizer

    from slmops.models.presets import create_model
    from slmops.models.tokenizer import save_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    model = create_model(TINY_MODEL_PRESET, vocab_size=len(tok), seed=0)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out
