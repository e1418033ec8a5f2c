"""Stage 2: student training (SFT on assistant tokens, logit KD), checkpoints, resume, early stopping, CLI,
and data parallelism under `accelerate launch` with 2 CPU processes. Tiny models, a few steps each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.distill.train import StudentTrainConfig, encode_chat, train_student
from slmops.errors import BadInputError

SRC = Path(__file__).resolve().parents[2] / "src"
FAST = dict(batch_size=4, threads=1, logging_steps=1, val_fraction=0.0)


def write_rows(path: Path, examples) -> Path:
    from slmops.demo.task import to_chat_row

    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(to_chat_row(ex)) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory, demo_examples) -> Path:
    return write_rows(tmp_path_factory.mktemp("data") / "train.jsonl", demo_examples[:64])


@pytest.fixture(scope="module")
def teacher_400(tmp_path_factory, demo_examples) -> Path:
    """A tiny teacher whose tokenizer (400 tokens) differs from the fixtures' (300)."""
    from slmops.models.create import write_model_folder
    from slmops.models.presets import create_model
    from slmops.models.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer([e.message for e in demo_examples] + [e.answer_text for e in demo_examples],
                              vocab_size=400)
    out = tmp_path_factory.mktemp("teacher400")
    write_model_folder(create_model("tiny-llama", vocab_size=len(tok), seed=3), tok, out)
    return out


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_labels_cover_assistant_tokens_only(tiny_tokenizer_dir, demo_examples):
    import copy

    from slmops.demo.task import to_chat_row
    from slmops.models.load import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    row = to_chat_row(demo_examples[0])
    ids, labels = encode_chat(tok, row["messages"], max_length=512)
    assert len(ids) == len(labels)
    first = next(i for i, v in enumerate(labels) if v != -100)
    assert all(v == -100 for v in labels[:first])  # the whole prompt is masked
    assert "user" in tok.decode(ids[:first]) and demo_examples[0].message in tok.decode(ids[:first])
    assert tok.decode([v for v in labels if v != -100]) == demo_examples[0].answer_text + "<|im_end|>"

    # a template without {% generation %} tags: the assistant span comes from rendering the prompt prefix
    plain = copy.deepcopy(tok)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids2, labels2 = encode_chat(plain, row["messages"], max_length=512)
    assert ids2 == ids and labels2 == labels

    short_ids, short_labels = encode_chat(tok, row["messages"], max_length=first + 3)
    assert len(short_ids) == first + 3 and sum(v != -100 for v in short_labels) == 3


def test_kd_training_changes_the_student(tiny_model_dir, chat_file, tmp_path):
    from slmops.models.presets import create_model

    calls = []
    cfg = StudentTrainConfig(student_preset="tiny-llama", teacher=str(tiny_model_dir), data=str(chat_file),
                             max_steps=3, kd_alpha=0.5, lr=1e-3, **{**FAST, "val_fraction": 0.25})
    report = train_student(cfg, tmp_path / "out", progress=lambda n, **kw: calls.append((n, kw)))
    assert report.kd_used and report.kd_reason is None and report.steps == 3
    assert report.train_rows == 48 and report.val_rows == 16
    assert report.val_loss is not None and report.tokens_seen > 0 and report.tokens_per_s > 0
    assert report.compat["compatible"] and report.parameters > 0
    # both loss parts are logged each step, and the loss mixes them as (1 - a) CE + a T^2 KD
    rows = [h for h in report.loss_history if "kd_loss" in h]
    assert len(rows) == 3
    for h in rows:
        assert h["loss"] == pytest.approx(0.5 * h["ce_loss"] + 0.5 * 4.0 * h["kd_loss"], rel=1e-3)
    # progress: the total first, then one advance per step with loss and tokens/s
    assert calls[0] == (0, {"status": "starting", "total": 3})
    assert sum(n for n, _ in calls) == 3 and "tok/s" in calls[-1][1]["status"]

    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "training.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "checkpoint-3").is_dir()
    assert json.loads((out / "training.json").read_text())["steps"] == 3
    before = create_model("tiny-llama", vocab_size=300, seed=cfg.seed).state_dict()
    after = weights(out)
    changed = [k for k, v in after.items() if not (v == before[k]).all()]
    assert len(changed) >= len(after) - 1, "every trained tensor should move"


def test_kd_trainer_loss_and_frozen_teacher(tiny_model_dir, chat_file, tmp_path):
    import torch
    from transformers import TrainingArguments

    from slmops.data import load_dataset_file
    from slmops.distill.kd import kd_loss
    from slmops.distill.train import ChatCollator, kd_trainer_class, tokenize_rows
    from slmops.models.load import load_model, load_tokenizer
    from slmops.models.presets import create_model

    tok = load_tokenizer(tiny_model_dir)
    rows, _ = tokenize_rows(tok, load_dataset_file(chat_file).records[:8], 512)
    collate = ChatCollator(tok.pad_token_id)
    teacher = load_model(tiny_model_dir)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = create_model("tiny-llama", vocab_size=len(tok), seed=5)
    args = TrainingArguments(output_dir=str(tmp_path / "ck"), use_cpu=True, report_to=[], max_steps=2,
                             per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                             learning_rate=1e-2)

    def trainer(alpha: float):
        return kd_trainer_class()(model=student, args=args, train_dataset=rows, data_collator=collate,
                                  teacher=teacher, kd_alpha=alpha, kd_temperature=2.0, kd_kind="forward")

    batch = collate(rows[:4])
    student.train()
    with torch.no_grad():
        s_out = student(**batch)
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl = kd_loss(s_out.logits, t_logits, batch["labels"], temperature=2.0)
        n_items = (batch["labels"][:, 1:] != -100).sum()
        pure_kd = trainer(1.0)
        assert pure_kd.compute_loss(student, dict(batch)).item() == pytest.approx(4.0 * kl.item(), rel=1e-5)
        # normalised by the accumulated batch's token count (the Trainer's path), the same value here
        assert pure_kd.compute_loss(student, dict(batch), num_items_in_batch=n_items).item() == pytest.approx(
            4.0 * kl.item(), rel=1e-5)
        assert trainer(0.0).compute_loss(student, dict(batch)).item() == pytest.approx(s_out.loss.item(), rel=1e-5)
        student.eval()  # evaluation reports the cross entropy only
        assert pure_kd.compute_loss(student, dict(batch)).item() == pytest.approx(s_out.loss.item(), rel=1e-5)

    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer(0.5).train()
    assert not all(torch.equal(v, student.state_dict()[k]) for k, v in student_before.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_mismatched_tokenizer_fails_before_loading_weights(tiny_model_dir, teacher_400, chat_file, tmp_path,
                                                           monkeypatch):
    import slmops.models.load as load_mod
    import slmops.models.presets as presets_mod

    def no_weights(*a, **kw):
        raise AssertionError("weights were loaded before the compatibility check")

    monkeypatch.setattr(load_mod, "load_model", no_weights)
    monkeypatch.setattr(presets_mod, "create_model", no_weights)
    cfg = StudentTrainConfig(student=str(tiny_model_dir), teacher=str(teacher_400), data=str(chat_file),
                             max_steps=2, **FAST)
    with pytest.raises(BadInputError) as exc:
        train_student(cfg, tmp_path / "out")
    text = str(exc.value)
    assert "student vocab 300 tokens vs teacher 400" in text and "token ids differ" in text
    assert "--allow-seq-level" in text and "--student-preset" in text
    assert not (tmp_path / "out").exists()


def test_mismatched_tokenizer_falls_back_when_allowed(tiny_model_dir, teacher_400, chat_file, tmp_path):
    cfg = StudentTrainConfig(student=str(tiny_model_dir), teacher=str(teacher_400), data=str(chat_file),
                             max_steps=2, allow_seq_level_fallback=True, **FAST)
    report = train_student(cfg, tmp_path / "out")
    assert not report.kd_used and report.kd_alpha == 0.0
    assert report.kd_reason.startswith("incompatible tokenizers, fell back to sequence-level")
    assert "student vocab 300 tokens vs teacher 400" in report.kd_reason
    assert report.steps == 2 and not any("kd_loss" in h for h in report.loss_history)


def test_padded_teacher_vocab_trains_with_kd(tiny_tokenizer_dir, chat_file, tmp_path):
    from slmops.models.create import write_model_folder
    from slmops.models.load import load_tokenizer
    from slmops.models.presets import create_model

    tok = load_tokenizer(tiny_tokenizer_dir)
    teacher = tmp_path / "teacher"
    write_model_folder(create_model("tiny-llama", vocab_size=len(tok) + 64, seed=2), tok, teacher)
    cfg = StudentTrainConfig(student_preset="tiny-llama", teacher=str(teacher), data=str(chat_file), max_steps=2,
                             kd_alpha=1.0, **FAST)
    report = train_student(cfg, tmp_path / "out")
    assert report.kd_used and report.compat["shared_vocab"] == 300
    assert report.compat["teacher_model_vocab"] == 364
    rows = [h for h in report.loss_history if "kd_loss" in h]
    assert rows and all(h["loss"] == pytest.approx(4.0 * h["kd_loss"], rel=1e-3) for h in rows)


def test_resume_continues_the_step_count(tiny_tokenizer_dir, chat_file, tmp_path):
    from transformers import TrainerCallback

    class StopAt3(TrainerCallback):  # simulates a run killed right after its step-3 checkpoint
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    common = dict(student_preset="tiny-llama", tokenizer=str(tiny_tokenizer_dir), data=str(chat_file),
                  max_steps=6, save_every=3, lr=3e-3, **FAST)
    interrupted = train_student(StudentTrainConfig(**common), tmp_path / "run", callbacks=[StopAt3()])
    assert interrupted.steps == 3
    resumed = train_student(StudentTrainConfig(**common, resume=True), tmp_path / "run")
    assert resumed.resumed_from.endswith("checkpoint-3")
    assert resumed.steps == 6
    assert [h["step"] for h in resumed.loss_history if "loss" in h] == [4, 5, 6]
    straight = train_student(StudentTrainConfig(**common), tmp_path / "straight")
    assert straight.resumed_from is None and straight.steps == 6
    a, b = weights(tmp_path / "run"), weights(tmp_path / "straight")
    import torch

    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed.train_loss == pytest.approx(straight.train_loss, rel=1e-5)


def test_early_stopping_stops_and_keeps_the_best(tiny_tokenizer_dir, chat_file, tmp_path):
    # a learning rate too small to move fp32 weights: the validation loss never improves after the first one
    cfg = StudentTrainConfig(student_preset="tiny-llama", tokenizer=str(tiny_tokenizer_dir), data=str(chat_file),
                             max_steps=40, lr=1e-30, weight_decay=0.0, lr_scheduler="constant", eval_every=1,
                             early_stopping_patience=2, **{**FAST, "val_fraction": 0.25})
    report = train_student(cfg, tmp_path / "out")
    assert report.stopped_early
    assert report.steps == 3  # evaluations at steps 1 (best), 2 and 3 (no improvement twice)
    assert report.val_loss == pytest.approx(report.best_val_loss)


def test_config_validation():
    with pytest.raises(Exception) as exc:
        StudentTrainConfig(student_preset="tiny-llama", tokenizer="t", data="d", kd_alpah=0.3)
    assert "kd_alpah" in str(exc.value)
    with pytest.raises(ValueError, match="exactly one of student"):
        StudentTrainConfig(data="d")
    with pytest.raises(ValueError, match="student_preset needs a tokenizer"):
        StudentTrainConfig(student_preset="tiny-llama", data="d")
    with pytest.raises(ValueError, match="early_stopping_patience needs validation data"):
        StudentTrainConfig(student="s", data="d", val_fraction=0, early_stopping_patience=2)
    with pytest.raises(BadInputError, match="kd_alpha"):
        train_student({"student": "s", "data": "d", "kd_alpha": 2}, "/nonexistent")


def test_cli_trains_and_registers_with_lineage(tiny_model_dir, demo_examples, tmp_path):
    from slmops.cli.app import run
    from slmops.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    teacher_id = ws.import_folder(tiny_model_dir, "model", "teacher").id
    data_dir = tmp_path / "synthetic"
    data_dir.mkdir()
    write_rows(data_dir / "train.jsonl", demo_examples[:40])
    write_rows(data_dir / "val.jsonl", demo_examples[40:50])
    data_id = ws.import_folder(data_dir, "dataset", "synthetic").id
    out = tmp_path / "student"
    rc = run(["-q", "-w", str(ws.root), "distill", "train", "--out", str(out), "--student-preset", "tiny-llama",
              "--teacher", teacher_id, "--data", data_id, "--max-steps", "2", "--batch-size", "4",
              "--threads", "1", "--kd-alpha", "0.7", "--kd-loss", "jsd", "--name", "student"])
    assert rc == 0
    report = json.loads((out / "training.json").read_text())
    assert report["kd_used"] and report["val_rows"] == 10 and report["train_rows"] == 40
    ws2 = Workspace(tmp_path / "ws")
    m = ws2.manifest(report["artifact_id"])
    assert m.kind == "model" and m.name == "student"
    assert m.parents == [teacher_id, data_id]
    assert m.config["kd_alpha"] == 0.7 and m.config["kd_loss"] == "jsd"
    assert m.metrics["kd_used"] is True and m.metrics["steps"] == 2
    assert "model.safetensors" in m.files and not any(f.startswith("checkpoints") for f in m.files)
    assert ws2.verify(m.id).ok
    # a second run into the same folder registers a new artifact and leaves the first one intact
    assert run(["-q", "-w", str(ws.root), "distill", "train", "--out", str(out), "--student-preset", "tiny-llama",
                "--teacher", teacher_id, "--data", data_id, "--max-steps", "1", "--batch-size", "4",
                "--threads", "1", "--seed", "1"]) == 0
    second = json.loads((out / "training.json").read_text())["artifact_id"]
    assert second != m.id and ws2.verify(second).ok and ws2.verify(m.id).ok


def test_cli_dry_run_loads_nothing_and_bad_keys_are_named(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("student_preset: demo-student\ntokenizer: tok\ndata: d.jsonl\nkd_alpha: 0.3\n")
    code = (
        "import sys\n"
        "from slmops.cli.app import run\n"
        f"rc = run(['distill', 'train', '--config', {str(recipe)!r}, '--out', 'o', '--kd-alpha', '0.9', '--dry-run'])\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print('RC', rc, 'HEAVY', heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "RC 0 HEAVY []" in out
    assert "kd_alpha: 0.9" in out and "student_preset: demo-student" in out and "data: d.jsonl" in out

    from slmops.cli.app import run

    recipe.write_text("student_preset: demo-student\ntokenizer: tok\ndata: d.jsonl\nkd_alpah: 0.3\n")
    assert run(["distill", "train", "--config", str(recipe), "--out", str(tmp_path / "o"), "--dry-run"]) == 2


def test_accelerate_launch_two_cpu_processes(tiny_model_dir, chat_file, tmp_path):
    """`accelerate launch` (torchrun underneath, gloo on CPU) runs the unchanged CLI in 2 processes; only the
    main process writes the model and registers it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws, out = tmp_path / "ws", tmp_path / "student"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port),
           "-m", "slmops", "-q", "-w", str(ws), "distill", "train", "--out", str(out),
           "--student-preset", "tiny-llama", "--teacher", str(tiny_model_dir), "--data", str(chat_file),
           "--max-steps", "3", "--batch-size", "4", "--threads", "1", "--val-fraction", "0.25", "--json"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])  # only rank 0 prints
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert report["steps"] == 3 and report["kd_used"]
    assert proc.stdout.count('"world_size"') == 1
    artifacts = list((ws / "artifacts").iterdir())
    assert len(artifacts) == 1 and report["artifact_id"] == artifacts[0].name
    assert (out / "model.safetensors").is_file()
