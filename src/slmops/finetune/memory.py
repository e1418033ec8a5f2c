"""Training memory estimate from the model's config alone (for `--dry-run`; no weights are read).

Counts, per method: the weights (fp32/bf16, or NF4 at ~0.53 bytes a parameter with double quantisation and
the layers kept dense), gradients and AdamW's two moments for the trainable parameters, and activations
kept for backward (per token and layer, about 34 * hidden + 5 * heads * length bytes in half precision per
Korthikanti et al., doubled for fp32; divided by the layers when checkpointing). It is an estimate of the
peak, +-30%, for choosing a method and batch size, not a guarantee.
"""

from __future__ import annotations

from typing import Any

from slmops.finetune.config import FinetuneConfig

NF4_BYTES_PER_PARAM = 0.53  # 4-bit codes + blockwise absmax (double-quantised), measured on Llama shapes


def lora_trainable(shapes: dict[str, tuple[int, int]], targets: list[str] | str, r: int) -> int:
    """LoRA parameters: r * (in + out) for every targeted linear layer."""
    total = 0
    for name, (fan_in, fan_out) in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        hit = (leaf != "lm_head") if targets == "all-linear" else leaf in targets
        if hit:
            total += r * (fan_in + fan_out)
    return total


def estimate_memory(cfg: FinetuneConfig) -> dict[str, Any]:
    """Estimated peak training memory of `cfg` in MB, by part, from the model's config.json."""
    from slmops.finetune.lora import BNB_CPU_BLOCK, default_target_modules, linear_shapes
    from slmops.models.load import model_info

    info = model_info(cfg.model)
    params = int(info["params"] or 0)
    shapes = linear_shapes(cfg.model)
    hidden = int(info.get("hidden_size") or 0)
    layers = int(info.get("num_layers") or 1)
    heads = int(info.get("num_attention_heads") or 1)
    vocab = int(info.get("vocab_size") or 0)
    weight_bytes = 2 if cfg.bf16 else 4
    if cfg.method == "full":
        trainable = params
        weights = params * weight_bytes
    else:
        targets = cfg.lora.target_modules if cfg.lora.target_modules is not None else \
            default_target_modules(info.get("model_type"))
        trainable = lora_trainable(shapes, targets, cfg.lora.r)
        if cfg.method == "qlora":
            quantised = sum(i * o for n, (i, o) in shapes.items()
                            if not n.endswith("lm_head") and not i % BNB_CPU_BLOCK)
            weights = quantised * NF4_BYTES_PER_PARAM + (params - quantised) * 4
        else:
            weights = params * weight_bytes
    grads = trainable * 4
    optimizer = trainable * 8  # AdamW: two fp32 moments
    tokens = cfg.batch_size * cfg.max_length
    per_token_layer = 34 * hidden + 5 * heads * cfg.max_length
    act_bytes = 1 if cfg.bf16 else 2  # the formula is for 16-bit activations
    activations = tokens * per_token_layer * act_bytes * (1 if cfg.gradient_checkpointing else layers)
    logits = tokens * vocab * 4 * 2  # fp32 logits and their gradient
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
             "logits": logits}
    mb = {k: round(v / 2**20, 1) for k, v in parts.items()}
    return {
        "model": cfg.model, "method": cfg.method, "parameters": params, "trainable_parameters": trainable,
        "trainable_share": round(trainable / params, 5) if params else None,
        "batch_tokens": tokens, "parts_mb": mb, "total_mb": round(sum(parts.values()) / 2**20, 1),
        "note": "estimate of the training peak (+-30%), excluding the framework's own ~300-500 MB",
    }


__all__ = ["estimate_memory", "lora_trainable"]
