"""Train the bundled demo teacher from scratch: `slmops demo train-teacher`.

A Llama (hidden 256, 4 layers, 4 heads, 2 KV heads, ~3.2M params) with a 1,024-token byte-level BPE
whose digits are split one by one, trained on freshly generated demo examples (a mix of the base and the
hard variant) with the loss on the answer only. Seeded; settings and wall time are returned so they land
in the artifact's manifest.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from slmops.demo import task

BUNDLED_TEACHER_DIR = Path(__file__).parent / "teacher"


@dataclass
class TeacherSettings:
    seed: int = 0
    steps: int = 2500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    train_examples: int = 40000
    hard_fraction: float = 0.25
    vocab_size: int = 1024
    preset: str = "demo-teacher"
    threads: int = 2


def tokenize_chat(tokenizer, rows: list[dict], max_length: int = 256) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per chat row, labels = -100 outside assistant turns (from `{% generation %}`)."""
    out = []
    for row in rows:
        enc = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(enc["input_ids"])[:max_length]
        mask = list(enc["assistant_masks"])[:max_length]
        labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        out.append((ids, labels))
    return out


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded tensors for training (input_ids, attention_mask, labels)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), width), dtype=torch.long)
    lab = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
        lab[i, : len(y)] = torch.tensor(y)
    return ids, att, lab


def teacher_training_rows(settings: TeacherSettings) -> list[dict]:
    """Fresh training examples, disjoint from the demo splits of seeds 0..4 (the ones we evaluate on)."""
    held_out: set[str] = set()
    for seed in range(5):
        for hard in (False, True):
            sizes = task.DemoSizes()
            n = sizes.train + sizes.val + sizes.test + sizes.prompts + sizes.gold
            held_out.update(e.message for e in task.generate(n, seed=seed, hard=hard)[sizes.train:])
    n_hard = int(settings.train_examples * settings.hard_fraction)
    exs = task.generate(settings.train_examples - n_hard, seed=1000 + settings.seed)
    exs += task.generate(n_hard, seed=1000 + settings.seed, hard=True)
    rows = [task.to_chat_row(e) for e in exs if e.message not in held_out]
    random.Random(settings.seed).shuffle(rows)
    return rows


def train_teacher(
    out_dir: str | Path,
    settings: TeacherSettings | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Train the demo teacher into `out_dir` (HF folder: config, safetensors, tokenizer); return a record
    of settings, wall time and final loss for the manifest."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from slmops.models.presets import count_parameters, create_model
    from slmops.models.tokenizer import save_tokenizer, train_bpe_tokenizer

    settings = settings or TeacherSettings()
    t0 = time.time()
    torch.manual_seed(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    rows = teacher_training_rows(settings)
    texts = [m["content"] for r in rows[:8000] for m in r["messages"]] + ["user", "assistant", "system"]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=settings.vocab_size)
    data = tokenize_chat(tokenizer, rows)
    model = create_model(settings.preset, vocab_size=len(tokenizer), seed=settings.seed)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.95),
    )
    sched = get_cosine_schedule_with_warmup(opt, settings.warmup_steps, settings.steps)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    for step in range(settings.steps):
        if len(order) < settings.batch_size:
            more = list(range(len(data)))
            rng.shuffle(more)
            order += more
        idx, order = order[: settings.batch_size], order[settings.batch_size :]
        ids, att, lab = collate([data[i] for i in idx], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(att.sum())
        if progress:
            progress(step + 1, settings.steps, float(loss))
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    # older readers (converters built for transformers 4) look for a top-level rope_theta
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    wall = time.time() - t0
    tail = losses[-50:]
    return {
        "settings": asdict(settings),
        "wall_time_s": round(wall, 1),
        "train_rows": len(data),
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "final_loss": round(sum(tail) / max(1, len(tail)), 5),
        "parameters": count_parameters(model),
        "lr_schedule": f"linear warm-up {settings.warmup_steps} steps, cosine to 0",
        "loss_curve_every_100": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 4)
                                 for i in range(0, len(losses), 100)],
        "finite": all(math.isfinite(x) for x in losses),
    }
