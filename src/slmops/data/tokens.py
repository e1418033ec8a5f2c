"""Token lengths of chat messages for a given tokenizer (transformers is imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, NotFoundError


def load_tokenizer(tokenizer: str | Path | Any) -> Any:
    """Load a tokenizer with ``AutoTokenizer.from_pretrained`` from a local folder; objects pass through."""
    if not isinstance(tokenizer, str | Path):
        return tokenizer
    path = Path(tokenizer)
    if not path.exists():
        raise NotFoundError(f"tokenizer folder not found: {path}", "pass a folder saved with save_pretrained")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise BadInputError(f"cannot load a tokenizer from {path}: {exc}") from exc


def render_text(tokenizer: Any, messages: list[dict]) -> str:
    """The text a model sees for `messages`: the tokenizer's chat template, else the contents joined.

    A conversation that ends with a user turn gets the generation prompt (the assistant header).
    """
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=messages[-1]["role"] != "assistant"
            )
        except TemplateError:
            pass  # e.g. a template that rejects system messages: fall back to the plain text
    return "\n".join(m["content"] for m in messages)


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts of `texts` (no special tokens added: chat templates already contain them)."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


def default_max_tokens(tokenizer: Any) -> int:
    """The tokenizer's ``model_max_length`` when it is a real limit, else BadInputError."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    raise BadInputError("the tokenizer states no maximum length", "pass --max-tokens N")
