"""Train a byte-level BPE tokenizer locally (no hub) and wrap it with a ChatML chat template."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    individual_digits: bool = True,
    chat_template: str = CHATML_TEMPLATE,
    model_max_length: int = 512,
):
    """Train a byte-level BPE on `texts` and return a `PreTrainedTokenizerFast`.

    Digits are split one by one before the byte-level step (as Llama 3 and Qwen do) so that a small model
    can copy numbers such as order ids. ChatML special tokens are added; eos is ``<|im_end|>``, pad is
    ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if individual_digits:
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=model_max_length,
        padding_side="left",
    )
    fast.chat_template = chat_template
    return fast


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Save with `save_pretrained`, and also put the chat template into tokenizer_config.json.

    transformers 5 writes the template to ``chat_template.jinja``; older readers (some converters) expect
    it inside ``tokenizer_config.json``, so both are written.
    """
    import json

    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if tokenizer.chat_template and "chat_template" not in cfg:
        cfg["chat_template"] = tokenizer.chat_template
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
