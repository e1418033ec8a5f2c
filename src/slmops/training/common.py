"""Training pieces shared by distillation (stage 2) and fine-tuning.

Chat rows are tokenized with the model's chat template and labelled on assistant tokens only (from the
template's ``{% generation %}`` tags, or by rendering the prompt prefix for templates without them);
:class:`ChatCollator` right-pads them (or takes packed rows with per-example position ids); the progress
callback drives a CLI progress bar with loss and tokens/s; the helpers resolve artifact references and
handle the data-parallel world (``accelerate launch`` / ``torchrun``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, NotFoundError

IGNORE_INDEX = -100
CHECKPOINTS_DIR = "checkpoints"
REPORT_FILE = "training.json"
# The file looked for when `data` is a folder (stage 1 writes it); `val.jsonl` beside it is the validation set.
DATA_FILE_NAMES = ("train.jsonl",)
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

ProgressFn = Callable[..., None]


# ------------------------------------------------------------------------------------------------- data


def resolve_data_files(path: str | Path) -> tuple[Path, Path | None]:
    """(training file, validation file or None) for a data file or a folder of them."""
    p = Path(path).expanduser()
    if p.is_file():
        return p, None
    if not p.is_dir():
        raise NotFoundError(f"no such data file or folder: {p}")
    val = p / "val.jsonl"
    for name in DATA_FILE_NAMES:
        if (p / name).is_file():
            return p / name, (val if val.is_file() else None)
    candidates = sorted(f.name for f in p.iterdir() if f.is_file() and f.suffix in DATA_SUFFIXES
                        and f.name != "slmops.json")
    if len(candidates) == 1:
        return p / candidates[0], (val if val.is_file() else None)
    raise BadInputError(
        f"data folder {p} has no {' / '.join(DATA_FILE_NAMES)}"
        + (f" and several data files ({', '.join(candidates)})" if candidates else " nor any data file"),
        "pass the training file itself with --data FILE",
    )


def has_generation_tags(template: str | None) -> bool:
    return bool(template and _GENERATION_TAG.search(template))


def _mask_by_prefix(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Assistant-token mask for templates without `{% generation %}`: each assistant turn is the text between
    the rendered prompt before it (with the generation prompt) and the conversation up to its end (trailing
    whitespace excluded). Turns whose rendering is not a prefix of the whole conversation are not trained on."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        end_text = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False)
        if full.startswith(start_text) and full.startswith(end_text):
            # the turn's trailing whitespace (ChatML's newline after <|im_end|>) is template, not answer
            spans.append((len(start_text), len(end_text.rstrip())))
    mask = [int(any(a <= s < b for a, b in spans)) for s, _ in offsets]
    return ids, mask


def encode_chat(tokenizer, messages: list[dict], max_length: int, train_on_inputs: bool = False,
                ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation: labels are -100 outside assistant turns (every token is a
    label with `train_on_inputs`)."""
    if has_generation_tags(getattr(tokenizer, "chat_template", None)):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    else:
        ids, mask = _mask_by_prefix(tokenizer, messages)
    ids, mask = ids[:max_length], mask[:max_length]
    if train_on_inputs:
        mask = [1] * len(ids)
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


def tokenize_rows(tokenizer, rows: list[dict], max_length: int, train_on_inputs: bool = False,
                  ) -> tuple[list[dict], int]:
    """Encode chat rows; rows left without any assistant token (after truncation) are dropped and counted."""
    out, dropped = [], 0
    for row in rows:
        ids, labels = encode_chat(tokenizer, row["messages"], max_length, train_on_inputs)
        # a label at position 0 is never predicted (causal shift), so count from 1
        if not any(t != IGNORE_INDEX for t in labels[1:]):
            dropped += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    return out, dropped


def pack_rows(rows: list[dict], max_length: int) -> list[dict]:
    """Greedy first-fit packing of tokenized rows into sequences of at most `max_length` tokens.

    Each packed row keeps its examples' labels and gets ``position_ids`` that restart at 0 for every
    example, so positions match unpacked training. Attention is still causal over the whole packed row
    (the CPU/SDPA path has no varlen kernel), as in TRL's non-padding-free packing; packing trades that
    cross-example context for fewer padding tokens. Order is deterministic."""
    bins: list[dict] = []
    for row in sorted(rows, key=lambda r: -len(r["input_ids"])):
        n = len(row["input_ids"])
        target = next((b for b in bins if len(b["input_ids"]) + n <= max_length), None)
        if target is None:
            target = {"input_ids": [], "labels": [], "position_ids": []}
            bins.append(target)
        target["input_ids"] += row["input_ids"]
        target["labels"] += row["labels"]
        target["position_ids"] += list(range(n))
    return bins


class ChatCollator:
    """Right-pads a list of {input_ids, labels[, position_ids]} to tensors input_ids / attention_mask /
    labels (and position_ids for packed rows)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((n, width), dtype=torch.long)
        lab = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        packed = any("position_ids" in f for f in features)
        pos = torch.zeros((n, width), dtype=torch.long) if packed else None
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            att[i, :k] = 1
            lab[i, :k] = torch.tensor(f["labels"], dtype=torch.long)
            if pos is not None:
                pos[i, :k] = torch.tensor(f.get("position_ids", range(k)), dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": att, "labels": lab}
        if pos is not None:
            batch["position_ids"] = pos
        return batch


# ---------------------------------------------------------------------------------------------- progress


def progress_callbacks(progress: ProgressFn | None, stats: dict):
    from transformers import TrainerCallback

    class StatsCallback(TrainerCallback):
        """Times the session, keeps the loss history and drives `progress(advance, status=..., total=...)`."""

        def on_train_begin(self, args, state, control, **kw):
            stats["t0"] = time.time()
            stats["tokens0"] = state.num_input_tokens_seen
            stats["last_step"] = 0
            stats["loss"] = None
            if progress is not None and state.is_world_process_zero:
                progress(0, status="starting", total=state.max_steps)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            row = {k: float(v) for k, v in logs.items() if k in ("loss", "eval_loss", "ce_loss", "kd_loss",
                                                                  "learning_rate", "epoch")}
            if "loss" in row:
                stats["loss"] = row["loss"]
            if "eval_loss" in row:
                stats["eval_loss"] = row["eval_loss"]
            if row:
                stats.setdefault("history", []).append({"step": state.global_step, **row})

        def on_step_end(self, args, state, control, **kw):
            if progress is None or not state.is_world_process_zero:
                return
            elapsed = max(1e-9, time.time() - stats["t0"])
            tps = (state.num_input_tokens_seen - stats["tokens0"]) / elapsed
            parts = []
            if stats.get("loss") is not None:
                parts.append(f"loss {stats['loss']:.3f}")
            if stats.get("eval_loss") is not None:
                parts.append(f"val {stats['eval_loss']:.3f}")
            parts.append(f"{tps:,.0f} tok/s")
            progress(state.global_step - stats["last_step"], status=" · ".join(parts))
            stats["last_step"] = state.global_step

    return [StatsCallback()]


# ----------------------------------------------------------------------------------------------- helpers


def resolve_ref(ref: str | None, workspace) -> tuple[str | None, str | None]:
    """(local folder or hub id, registered artifact id or None) for a model/data reference."""
    if ref is None:
        return None, None
    if workspace is None:
        return str(Path(ref).expanduser()) if Path(ref).expanduser().exists() else ref, None
    try:
        folder = workspace.resolve(ref)
    except NotFoundError:
        return ref, None
    art_id = None
    try:
        art_id = workspace.artifact_id(folder)
    except Exception:  # a folder whose slmops.json is unreadable is still usable as a plain folder
        art_id = None
    if art_id is not None and workspace.registry.get(art_id) is None:
        art_id = None
    return str(folder), art_id


def world() -> tuple[int, int]:
    """(world size, global rank) from the launcher's environment (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def backend() -> str | None:
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def unshare_files(out: Path) -> None:
    """Unlink the files of `out` that are hard-linked into a registered artifact (a previous run's), so that
    writing the new model creates new files instead of changing the artifact's in place."""
    for p in out.iterdir():
        if p.is_file() and p.stat().st_nlink > 1:
            p.unlink()


def write_report(out: Path, report: Any) -> None:
    """Write `report.to_dict()` as ``training.json`` atomically."""
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    os.replace(tmp, out / REPORT_FILE)


def clean_checkpoints(ckpt_dir: Path) -> list[str]:
    """Remove checkpoints a kill left half-written (no readable trainer_state.json, which the Trainer writes
    last), so that resuming picks the last complete one. Returns the names removed."""
    removed: list[str] = []
    if not ckpt_dir.is_dir():
        return removed
    for ck in sorted(ckpt_dir.glob("checkpoint-*")):
        try:
            json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            shutil.rmtree(ck, ignore_errors=True)
            removed.append(ck.name)
    return removed


def prepare_checkpoints(ckpt_dir: Path, resume: bool, rank: int, log) -> str | None:
    """The checkpoint to resume from (the last complete one in `ckpt_dir`, with `resume`), or None. A fresh run
    removes a previous run's checkpoints (on rank 0) so that a later resume cannot pick them up."""
    if resume:
        from transformers.trainer_utils import get_last_checkpoint

        if rank == 0:
            for name in clean_checkpoints(ckpt_dir):
                log.warning("resume: removed %s, which a crash left half-written", name)
        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        if last is None:
            log.warning("resume: no checkpoint in %s, starting from scratch", ckpt_dir)
        return last
    if ckpt_dir.is_dir() and any(ckpt_dir.glob("checkpoint-*")) and rank == 0:
        log.warning("starting from scratch: removing the previous run's checkpoints in %s", ckpt_dir)
        for old in ckpt_dir.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
    return None


def register_folder(workspace, kind: str, name: str, out: Path, config: dict, parents: list[str],
                    metrics: dict) -> str:
    """Register the training output folder `out` (without checkpoints) as a `kind` artifact; returns its id.

    The files are hard-linked into the artifact when the filesystem allows (no second copy of the weights),
    else copied; `unshare_files` keeps a later run in the same `out` from writing through the links."""
    with workspace.create_artifact(kind, name, config=config, parents=parents, metrics=metrics) as w:
        for p in out.iterdir():
            if p.name in (CHECKPOINTS_DIR, "slmops.json"):
                continue
            if p.is_dir():
                shutil.copytree(p, w.path / p.name, copy_function=link_or_copy)
            else:
                link_or_copy(p, w.path / p.name)
        return w.id
