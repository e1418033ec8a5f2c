"""LoRA/QLoRA set-up on PEFT and bitsandbytes: default target modules, the 4-bit availability check (before
any weight loads) and the CPU fixes that make 4-bit LoRA gradients right.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from slmops.errors import BadInputError
from slmops.finetune.config import LoraSettings

log = logging.getLogger(__name__)
# bitsandbytes warns on import that an optional faster CPU kernel package is missing; it trains without it
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Attention and MLP projections per architecture (the QLoRA paper's "all linear layers" but the head).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _ATTN_MLP, "mistral": _ATTN_MLP, "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _ATTN_MLP, "qwen3": _ATTN_MLP, "gemma": _ATTN_MLP, "gemma2": _ATTN_MLP, "gemma3_text": _ATTN_MLP,
    "granite": _ATTN_MLP, "olmo2": _ATTN_MLP, "smollm3": _ATTN_MLP,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
# bitsandbytes' CPU 4-bit kernels need input widths that are multiples of this; other layers stay dense
BNB_CPU_BLOCK = 64


def default_target_modules(model_type: str | None) -> list[str] | str:
    return DEFAULT_TARGETS.get(model_type or "", "all-linear")


def lora_config(settings: LoraSettings, model_type: str | None):
    """A ``peft.LoraConfig`` for causal LM training from our settings."""
    from peft import LoraConfig

    targets = settings.target_modules if settings.target_modules is not None else default_target_modules(model_type)
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
        modules_to_save=settings.modules_to_save, use_dora=settings.use_dora, bias=settings.bias,
        task_type="CAUSAL_LM",
    )


def qlora_unavailable_reason() -> str | None:
    """Why 4-bit (bitsandbytes NF4) training cannot run here, or None when it can. Loads no weights."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # a broken native library shows here
        return f"bitsandbytes does not import on this machine: {exc}"
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if torch.cuda.is_available():
        return None
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "bitsandbytes 4-bit training does not support Apple MPS"
    if version < (0, 45):
        return f"bitsandbytes {bnb.__version__} has no CPU 4-bit backend (0.45 or newer has)"
    return None


def check_qlora_available() -> None:
    reason = qlora_unavailable_reason()
    if reason:
        raise BadInputError(
            f"QLoRA (4-bit NF4 base) cannot train here: {reason}",
            "use --method lora (LoRA on the full-precision base: more memory, same adapter format), or install "
            "bitsandbytes on a machine it supports (CUDA GPUs; x86 CPUs with bitsandbytes >= 0.45)",
        )


def linear_shapes(model_ref: str) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of the model's linear layers, built on the meta device
    from its config (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slmops.models.load import _resolve

    source = _resolve(model_ref)
    config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def quantization_config(model_ref: str, compute_dtype=None):
    """The ``BitsAndBytesConfig`` for QLoRA: NF4 with double quantisation. On CPU, layers whose input width
    is not a multiple of 64 (and the output head) stay in full precision, as the CPU kernels need it."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = ["lm_head"]
    if not torch.cuda.is_available():
        odd = sorted({name.rsplit(".", 1)[-1] for name, (fan_in, _) in linear_shapes(model_ref).items()
                      if fan_in % BNB_CPU_BLOCK})
        if odd:
            log.info("QLoRA on CPU: keeping %s in full precision (input width not a multiple of %d)",
                     ", ".join(odd), BNB_CPU_BLOCK)
        skip += [n for n in odd if n != "lm_head"]
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32),
        llm_int8_skip_modules=skip,
    )


def fix_cpu_4bit(model: Any) -> int:
    """Turn off bitsandbytes' in-place AVX512-BF16 repacking of 4-bit weights on CPU: after the first no-grad
    forward it makes LoRA gradients silently wrong (see shared/ENVIRONMENT.md). Returns the layers touched."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_nf4_rounded(model_ref: str):
    """A dense fp32 copy of `model_ref` whose weights are exactly what QLoRA's 4-bit base computes with
    (NF4-quantised then dequantised). A QLoRA adapter on it reproduces the trained model numerically, with
    dense CPU speed: use it to evaluate or merge a QLoRA adapter."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from slmops.models.load import load_model

    quantised = load_model(model_ref, dtype="float32", quantization_config=quantization_config(model_ref))
    dense = load_model(model_ref, dtype="float32")
    modules = dict(dense.named_modules())
    for name, m in quantised.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            modules[name].weight.data = dequantize_4bit(m.weight.data, m.weight.quant_state).float()
    del quantised
    return dense


def count_4bit_layers(model: Any) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


__all__ = [
    "DEFAULT_TARGETS",
    "check_qlora_available",
    "count_4bit_layers",
    "default_target_modules",
    "fix_cpu_4bit",
    "linear_shapes",
    "load_nf4_rounded",
    "lora_config",
    "qlora_unavailable_reason",
    "quantization_config",
]
